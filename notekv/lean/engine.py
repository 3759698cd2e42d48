"""``LeanEngine``: a static KV buffer plus the lean forward, for composing and continuing.

One engine per model (``model.lean(capacity)`` returns it, growing it when needed). It
holds stacked K/V ``[L, 1, H_kv, capacity, D]`` in the model's dtype, zero-filled (a masked
slot must hold a finite value: zero attention weight times NaN is NaN). The filled slots
are ``[0, length)``; :meth:`place` moves a precompiled :class:`~notekv.kv.KVCache` into
them with the fused rotation writing straight into the buffer, :meth:`prefill` runs new
tokens after them and returns the last token's logits, :meth:`truncate` forgets a tail.

Modes: ``"graph"`` (default on CUDA) replays a CUDA graph captured per suffix length,
attending over the whole buffer under the mask so one graph serves every context length;
``"static"`` runs that same whole-buffer computation without capture (any device: how the
graph's computation is checked on CPU); ``"eager"`` (default elsewhere) attends over
``[0, length + s)`` only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from ..kv import KVCache, PositionError, rotate_keys
from ..kv.rope import layer_specs
from ..model.arch import get_submodule
from .forward import check_lean, lean_forward, layer_refs, rope_tables
from .graphs import GraphCache

ALIGN = 64  # capacity granularity (slots): keeps the attention kernels' key axis aligned
MODES = ("graph", "static", "eager")
CHUNK = 1024  # longest single call (and captured graph); longer prefills go in chunks


class LeanEngine:
    """Static-cache runtime for ``model`` (a HookedModel on any device). It calls the
    model's modules' ``forward`` directly: hooks registered on them do not fire here.

    ``capacity``: slots in the buffer (rounded up to a multiple of 64, at most the model's
    positions). ``mode``: ``"graph"``, ``"static"`` or ``"eager"`` (see the module
    docstring; default ``"graph"`` on CUDA, else ``"eager"``).
    """

    def __init__(self, model, capacity: int, *, mode: str | None = None):
        check_lean(model)
        spec = model.spec
        if capacity < 1:
            raise InputError(f"capacity={capacity}: must be at least 1 slot")
        if capacity > spec.max_positions:
            raise PositionError(
                f"a buffer of {capacity} slots exceeds {model.name}'s positions 0..{spec.max_positions - 1}; "
                "shorten the context"
            )
        capacity = min(-(-capacity // ALIGN) * ALIGN, spec.max_positions)
        self.model = model
        self.spec = spec
        self.capacity = capacity
        param = next(model.hf.parameters())
        self.dtype, self.device = param.dtype, param.device
        shape = (spec.n_layers, 1, spec.n_kv_heads, capacity, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.token_ids = torch.zeros(capacity, dtype=torch.int64)
        self.length = 0
        self.chunk = CHUNK
        self.epoch = 0  # bumps whenever filled slots change: lets snapshots detect reuse
        lay = spec.layout
        hf = model.hf
        self._refs = layer_refs(model)
        self._embed = get_submodule(hf, lay.embed)
        self._final_norm = get_submodule(hf, lay.final_norm)
        self._unembed = get_submodule(hf, lay.unembed)
        self._softcap = model.spec.final_logit_softcap
        self._tables = rope_tables(spec, torch.arange(capacity), self.dtype, self.device)
        inv = torch.tensor([r.inv_freq for r in spec.rope], dtype=torch.float64)
        self._rope = (inv, spec.rope[0].rotary_dim, spec.rope[0].pairing)
        mode = ("graph" if self.device.type == "cuda" else "eager") if mode is None else mode
        if mode not in MODES:
            raise InputError(f"mode {mode!r}: choose one of {MODES}")
        if mode == "graph" and self.device.type != "cuda":
            raise InputError("mode='graph': CUDA graphs need the model on a CUDA device; use mode='static' or 'eager'")
        self.mode = mode
        self.graphs = None if mode == "eager" else GraphCache(self._forward, capture=mode == "graph")

    def __repr__(self) -> str:
        return (f"LeanEngine({self.model.name!r}, length={self.length}, capacity={self.capacity}, "
                f"mode={self.mode!r})")

    # ------------------------------------------------------------------ state
    def _forward(self, ids: torch.Tensor, qpos: torch.Tensor, kv_len: int, logits: str | None):
        s = self.spec
        return lean_forward(self._refs, self._embed, self._final_norm, self._unembed, self._tables,
                            self.keys, self.values, ids, qpos, kv_len, n_heads=s.n_heads,
                            n_kv_heads=s.n_kv_heads, head_dim=s.head_dim, softcap=self._softcap, logits=logits)

    def _room(self, at: int, n: int) -> None:
        if at < 0 or at > self.length:
            raise InputError(f"at={at}: slot outside the filled slots 0..{self.length} (write at or before the end)")
        if at + n > self.capacity:
            raise PositionError(
                f"{n} tokens at slot {at} need {at + n} slots; the engine holds {self.capacity} "
                "(ask model.lean(capacity) for a larger one)"
            )

    def truncate(self, length: int) -> None:
        """Forget slots ``[length, self.length)``."""
        if not 0 <= length <= self.length:
            raise InputError(f"length={length}: cannot truncate to it, {self.length} slots are filled "
                             f"(choose 0..{self.length})")
        self.length = length
        self.epoch += 1

    def clear(self) -> None:
        self.truncate(0)

    # ------------------------------------------------------------------ writing
    def place(self, cache: KVCache, at: int | None = None, *, backend: str = "auto") -> tuple[int, int]:
        """Copy ``cache`` into slots ``[at, at + len)`` (default: the end), rotating its keys
        from their original positions to those slots in the same pass (the fused op writes
        into the buffer). Later slots are forgotten. Returns ``(start, end)``."""
        cache.check_model(self.model)
        if cache.keys.shape[1] != 1:
            raise InputError(f"cache: the lean engine holds one sequence; place a batch-1 cache, got batch "
                             f"{cache.keys.shape[1]}")
        at = self.length if at is None else at
        n = len(cache)
        self._room(at, n)
        for r in cache.rope:
            r.check()
        inv, rotary_dim, pairing = self._rope
        dst = torch.arange(at, at + n)
        src_keys = cache.origin_keys.to(self.device, self.dtype).contiguous()
        rotate_keys(src_keys, dst - cache.origin_positions, inv, rotary_dim=rotary_dim, pairing=pairing,
                    dst=self.keys, src_index=torch.arange(n), dst_index=dst, backend=backend)
        self.values[:, :, :, at : at + n].copy_(cache.values)
        self.token_ids[at : at + n] = cache.token_ids
        self.length = at + n
        self.epoch += 1
        return at, at + n

    @torch.no_grad()
    def prefill(self, ids: Sequence[int] | torch.Tensor, *, at: int | None = None,
                logits: str | None = "last") -> torch.Tensor | None:
        """Run ``ids`` at slots ``[at, at + s)`` (default: after the filled slots) against the
        slots before them. Returns float32 logits: the last token's ``[1, vocab]``
        (``logits="last"``), every token's ``[1, s, vocab]`` (``"all"``) or None.

        With ``at`` inside the filled slots the tokens are recomputed in place (seam repair);
        later filled slots are kept (the causal mask hides them from these tokens).
        """
        if logits not in ("last", "all", None):
            raise InputError(f"logits={logits!r}: choose 'last', 'all' or None")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(1, -1)
        s = ids.shape[1]
        if s == 0:
            raise InputError("ids: prefill needs at least one token, got none")
        at = self.length if at is None else at
        self._room(at, s)
        step = self.chunk
        if s > step:
            # Long inputs run eagerly in chunks (the mask of one call is [g * chunk, slots]);
            # graphs are for the short suffixes and decode steps that follow.
            parts = []
            for c in range(0, s, step):
                last = c + step >= s
                parts.append(self._call(ids[:, c : c + step], at + c, logits if last or logits == "all" else None,
                                        eager=True))
                self.length = max(self.length, at + min(c + step, s))
            out = torch.cat(parts, dim=1) if logits == "all" else parts[-1]
        else:
            out = self._call(ids, at, logits)
        self.token_ids[at : at + s] = ids[0]
        self.length = max(self.length, at + s)
        self.epoch += 1
        return out

    def _call(self, ids: torch.Tensor, at: int, logits: str | None, eager: bool = False):
        s = ids.shape[1]
        if self.graphs is not None and not eager:
            return self.graphs.replay(ids.to(self.device), at, self.capacity, logits)
        qpos = torch.arange(at, at + s, device=self.device)
        return self._forward(ids.to(self.device), qpos, max(self.length, at + s), logits)

    def decode(self, token_id: int) -> torch.Tensor:
        """One token after the filled slots; returns its logits ``[1, vocab]``."""
        return self.prefill([int(token_id)])

    @torch.no_grad()
    def greedy(self, logits: torch.Tensor, n: int) -> list[int]:
        """Greedy continuation: the argmax of ``logits`` (what :meth:`prefill` returned), then
        ``n - 1`` decode steps, each appending the previous token. Returns the ``n`` new ids
        (the last one is not in the buffer yet)."""
        new: list[int] = []
        for i in range(n):
            new.append(int(logits[0].argmax()))
            if i + 1 < n:
                logits = self.decode(new[-1])
        return new

    # ------------------------------------------------------------------ reading
    def snapshot(self, segments: Sequence[str] | str = "") -> KVCache:
        """The filled slots as a new :class:`KVCache` (a copy: the engine's buffer is reused);
        ``segments``: one label for all slots or one per slot."""
        n = self.length
        segments = (segments,) * n if isinstance(segments, str) else tuple(segments)
        return KVCache(self.keys[..., :n, :].clone(), self.values[..., :n, :].clone(), torch.arange(n),
                       self.token_ids[:n].clone(), segments, dict(self.model.fingerprint),
                       layer_specs(self.spec), self.spec.max_positions)


def engine_for(model, capacity: int, *, mode: str | None = None) -> LeanEngine:
    """The model's engine with at least ``capacity`` slots, emptied: reused while it is large
    enough (and in ``mode``, if given), replaced (buffers and graphs dropped) otherwise."""
    current = getattr(model, "_lean_engine", None)
    if current is not None and current.capacity >= capacity and mode in (None, current.mode):
        current.clear()
        return current
    model._lean_engine = None
    del current  # the old buffers and graphs go before the new ones are allocated
    engine = LeanEngine(model, capacity, mode=mode)
    model._lean_engine = engine
    return engine
