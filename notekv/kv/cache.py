"""``KVCache``: keys and values of every layer, plus what each slot is.

Keys and values are stacked over layers, ``[L, B, H_kv, S, D]`` (per-layer views are what
transformers' cache layers hold, so conversion is copy-free). Per slot the cache records
the RoPE position its key is rotated to, its token id and a segment label. Sliding-window
layers keep every token (the attention mask enforces the window).

A KVCache is immutable: ``select``, ``drop``, ``patch``, ``concat`` and ``reposition``
return new caches and copy only what they change. It carries the fingerprint of the model
that computed it; every operation that combines caches or hands one to a model checks it.
``reposition`` always rotates from the keys as originally computed, so moving a cache ten
times costs the error of one move.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from jaxtyping import Float, Int

from ..errors import InputError, check_int
from .fused import rotate_keys
from .rope import RopeSpec, check_positions, layer_specs, rope_offset, rope_table


KV_BUDGET = 1 << 30  # bytes of K/V one batched forward over a shared cache may materialise (1 GiB)


class CacheMismatchError(InputError):
    """Caches or a cache and a model that do not belong together."""


class PositionError(InputError, IndexError):
    """A move that would place a key outside the model's position range."""


@dataclass(frozen=True, eq=False)
class KVCache:
    """Stacked K/V with per-slot metadata. Build with :meth:`from_run` or :meth:`from_hf`.

    ``keys``/``values``: ``[L, B, H_kv, S, D]``; ``positions``, ``token_ids``: ``[S]`` int64;
    ``segments``: one label per slot; ``origin_keys``/``origin_positions``: the keys as first
    computed and their positions (what :meth:`reposition` rotates from).

    Latent attention (DeepSeek MLA): ``keys`` are the per-head keys the model expands from
    its latent (``qk_nope`` un-rotated dims, then the ``qk_rope`` rotary dims shared by all
    heads) and ``values`` have ``v_head_dim`` dims (``ArchSpec.v_dim``); a move turns only the
    rotary dims. Multimodal RoPE (Qwen2.5-VL): a slot's RoPE position has three components
    (temporal, height, width); ``positions`` holds one number per slot, the place moves are
    measured from. notekv places tokens with all three components equal to it; a slot of an
    image placeholder (components differ; wrapped with :meth:`from_hf`, position default its
    slot index) keeps its components' differences in its key, and a move by ``d`` shifts all
    three by ``d``, which turns every frequency band by ``d``: the usual rotation.
    """

    keys: Float[torch.Tensor, "layers batch kv_heads slots head_dim"]
    values: Float[torch.Tensor, "layers batch kv_heads slots v_dim"]
    positions: Int[torch.Tensor, "slots"]
    token_ids: Int[torch.Tensor, "slots"]
    segments: tuple[str, ...]
    fingerprint: dict
    rope: tuple[RopeSpec, ...]
    max_positions: int
    origin_keys: torch.Tensor | None = field(default=None, repr=False)
    origin_positions: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        L, B, H, S, D = self.keys.shape
        if self.values.shape[:4] != (L, B, H, S):
            raise InputError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} disagree")
        if self.positions.shape != (S,) or self.token_ids.shape != (S,) or len(self.segments) != S:
            raise InputError(f"per-slot metadata must have {S} entries")
        if self.origin_keys is None:
            object.__setattr__(self, "origin_keys", self.keys)
            object.__setattr__(self, "origin_positions", self.positions)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_hf(cls, cache, model, token_ids: Sequence[int] | torch.Tensor, *, positions=None,
                segment: str = "", segments: Sequence[str] | None = None) -> "KVCache":
        """Wrap a transformers cache computed by ``model`` (a HookedModel). Every layer must
        hold every token (prefill through notekv keeps sliding layers full). ``segments``
        labels each slot (default: ``segment`` for all). A hybrid's cache (state-space layers:
        ``model.spec.kv_refusal``) is refused with the reason."""
        if model.spec.kv_refusal is not None:
            from ..model.arch import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"a KVCache of this {model.spec.model_type} model (run.kv, KVCache.prefill and what takes one: "
                f"KVPatch, splice, compose, the batched runner, KV attribution) cannot exist: {model.spec.kv_refusal}")
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise InputError(f"cache: a {type(cache).__name__} is not a transformers cache (DynamicCache); pass "
                             "run.hf_cache, or use KVCache.from_run(run, model)")
        lengths = {l.keys.shape[2] for l in layers}
        if len(lengths) != 1:
            raise CacheMismatchError(
                f"cache layers hold {sorted(lengths)} tokens: a sliding-window cache dropped tokens; "
                "prefill with model.run to keep every layer full"
            )
        if len(layers) != model.spec.n_layers:
            raise CacheMismatchError(f"cache has {len(layers)} layers, {model.name} has {model.spec.n_layers}")
        if model.spec.layout.kv_expand:  # latent attention: per-head K/V, expanded where the cache holds latents
            from ..hooks.latent import expanded_layers

            keys, values = (torch.stack(t) for t in expanded_layers(layers, model))
        else:
            keys = torch.stack([l.keys for l in layers])
            values = torch.stack([l.values for l in layers])
        s = keys.shape[3]
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() != s:
            raise InputError(f"token_ids: {ids.numel()} token ids for a cache of {s} slots")
        pos = torch.arange(s) if positions is None else torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        labels = (segment,) * s if segments is None else tuple(segments)
        return cls(keys, values, pos, ids, labels, dict(model.fingerprint), layer_specs(model.spec),
                   model.spec.max_positions)

    @classmethod
    def from_run(cls, run, model, *, segment: str = "", positions=None) -> "KVCache":
        """The cache of a :class:`~notekv.hooks.run.Run` (``run.kv``), relabelled ``segment``
        and, with ``positions``, declared to sit at those positions."""
        if not hasattr(run, "kv"):
            raise InputError(f"run: a {type(run).__name__} is not a notekv Run; pass what model.run returns")
        kv = run.kv
        if kv is None:
            raise CacheMismatchError("this Run kept no cache (it came from a backend without one); use model.run")
        kv.check_model(model)
        if positions is not None:
            pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
            if pos.shape != kv.positions.shape:
                raise InputError(f"positions: {pos.numel()} positions for a cache of {len(kv)} slots")
            kv = replace(kv, positions=pos, origin_positions=pos)
        return kv.relabel(segment)

    @classmethod
    def prefill(cls, model, text_or_ids, *, segment: str = "", offset: int = 0) -> "KVCache":
        """Prefill ``text_or_ids`` with keys rotated to positions ``offset, offset + 1, ...``."""
        offset = check_int("offset", offset)
        run = model.run(text_or_ids, positions=offset, logits="last")
        return cls.from_run(run, model, segment=segment, positions=torch.arange(run.ids.shape[1]) + offset)

    # ------------------------------------------------------------------ views
    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    def __len__(self) -> int:
        return self.keys.shape[3]

    def to_hf(self, room: int = 0):
        """A transformers ``DynamicCache`` continuing from this cache; this cache never changes.

        ``room == 0``: layers are views of this cache (no copy); each append concatenates
        into new tensors. ``room > 0``: each layer gets its own preallocated buffer with
        ``room`` free slots (one copy now, then appends write in place: better for decoding).
        """
        from .hf import dynamic_cache

        return dynamic_cache(self.keys, self.values, check_int("room", room, low=0))

    def layer_kv(self, layer: int) -> tuple[Float[torch.Tensor, "batch kv_heads slots head_dim"],
                                            Float[torch.Tensor, "batch kv_heads slots v_dim"]]:
        """Keys and values ``[B, H_kv, S, D]`` of ``layer`` (views, no copy)."""
        if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < self.keys.shape[0]):
            layer = check_int("layer", layer, low=0, high=self.keys.shape[0] - 1)
        return self.keys[layer], self.values[layer]

    def check_model(self, model) -> None:
        """Raise :class:`CacheMismatchError` unless ``model`` computed this cache."""
        if dict(model.fingerprint) != self.fingerprint:
            raise CacheMismatchError(
                f"this cache was computed by another model ({self.fingerprint}); {model.name} is "
                f"{model.fingerprint}. Recompute the cache with this model."
            )

    def _check_peer(self, other: "KVCache") -> None:
        if not isinstance(other, KVCache):
            raise InputError(f"{type(other).__name__} {other!r:.40} is not a KVCache; pass a cache (KVCache.prefill, "
                             "run.kv)")
        if other.fingerprint != self.fingerprint:
            raise CacheMismatchError(
                f"caches from different models cannot be combined: {self.fingerprint} vs {other.fingerprint}"
            )

    # ------------------------------------------------------------------ edits
    def _with_slots(self, idx: torch.Tensor) -> "KVCache":
        return replace(
            self, keys=self.keys.index_select(3, idx), values=self.values.index_select(3, idx),
            positions=self.positions[idx], token_ids=self.token_ids[idx],
            segments=tuple(self.segments[i] for i in idx.tolist()),
            origin_keys=self.origin_keys.index_select(3, idx), origin_positions=self.origin_positions[idx],
        )

    def _slot_index(self, slots, what: str) -> torch.Tensor:
        """Slots as an index, refusing negative, fractional or out-of-range ones (no wrap-around)."""
        vals = [check_int(f"{what} slot", s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        bad = [s for s in vals if not 0 <= s < len(self)]
        if bad:
            raise PositionError(f"{what}: slot {bad[0]} is outside this cache's slots 0..{len(self) - 1} "
                                "(negative slots do not count from the end here; pass explicit slots)")
        return torch.tensor(vals, dtype=torch.int64)

    def select(self, slots: Sequence[int] | slice) -> "KVCache":
        """A cache of the given slots, in order (a slice is read as Python reads it)."""
        if isinstance(slots, slice):
            try:
                idx = torch.arange(len(self))[slots]
            except (ValueError, TypeError) as err:
                raise InputError(f"select: slice {slots!r} ({err}); pass a slice of whole numbers with a step >= 1, "
                                 "or a list of slots") from None
        else:
            idx = self._slot_index(slots, "select")
        return self._with_slots(idx)

    def drop(self, slots: Sequence[int]) -> "KVCache":
        """A cache without the given slots."""
        gone = set(self._slot_index(slots, "drop").tolist())
        return self._with_slots(torch.tensor([i for i in range(len(self)) if i not in gone], dtype=torch.int64))

    def patch(self, source: "KVCache", slots: Sequence[int], *, layers: Sequence[int] | None = None,
              heads: Sequence[int] | None = None, which: str = "kv") -> "KVCache":
        """A copy with ``source``'s keys/values at ``slots`` (copy-on-write of K and/or V)."""
        self._check_peer(source)
        if which not in ("k", "v", "kv"):
            raise InputError(f"which={which!r}: choose 'k', 'v' or 'kv'")
        idx = self._slot_index(slots, "patch")
        if idx.numel() and int(idx.max()) >= len(source):
            raise PositionError(f"patch: slot {int(idx.max())} is outside the source's slots 0..{len(source) - 1}")
        ls = torch.arange(self.n_layers) if layers is None else torch.tensor(
            [check_int("layer", l, low=0, high=self.n_layers - 1) for l in layers], dtype=torch.int64)
        hs = torch.arange(self.keys.shape[2]) if heads is None else torch.tensor(
            [check_int("head", h, low=0, high=self.keys.shape[2] - 1) for h in heads], dtype=torch.int64)
        sel = (ls[:, None, None], slice(None), hs[None, :, None], idx[None, None, :])
        changes = {}
        if "k" in which:
            keys = self.keys.clone()
            keys[sel[0], :, sel[2], sel[3]] = source.keys[sel[0], :, sel[2], sel[3]]
            changes.update(keys=keys, origin_keys=keys, origin_positions=self.positions)
        if "v" in which:
            values = self.values.clone()
            values[sel[0], :, sel[2], sel[3]] = source.values[sel[0], :, sel[2], sel[3]]
            changes["values"] = values
        return replace(self, **changes)

    def concat(self, *others: "KVCache") -> "KVCache":
        """Slots of ``self`` then of each of ``others`` (positions kept as they are)."""
        parts = (self,) + others
        for o in others:
            if not isinstance(o, KVCache):
                raise InputError(f"concat: {type(o).__name__} {o!r:.40} is not a KVCache; pass caches only")
            self._check_peer(o)
            if o.keys.shape[:3] != self.keys.shape[:3] or o.keys.shape[4] != self.keys.shape[4] \
                    or o.values.shape[4] != self.values.shape[4]:
                raise InputError(f"concat: caches of shapes {tuple(self.keys.shape)} and {tuple(o.keys.shape)} "
                                 "(layers, batch, heads, slots, dim) differ beyond their slots")
        return replace(
            self, keys=torch.cat([p.keys for p in parts], 3), values=torch.cat([p.values for p in parts], 3),
            positions=torch.cat([p.positions for p in parts]), token_ids=torch.cat([p.token_ids for p in parts]),
            segments=sum((p.segments for p in parts), ()),
            origin_keys=torch.cat([p.origin_keys for p in parts], 3),
            origin_positions=torch.cat([p.origin_positions for p in parts]),
        )

    def save(self, path, *, overwrite: bool = False):
        """Write to ``path`` all-or-nothing (safetensors + JSON metadata); a file there with
        different content is replaced only with ``overwrite=True``. See :mod:`notekv.kv.store`."""
        from .store import save_cache

        return save_cache(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, model) -> "KVCache":
        """Read a saved cache, refusing another model's, a corrupt file or a bad checksum."""
        from .store import load_cache

        return load_cache(path, model)

    @property
    def row_bytes(self) -> int:
        """Bytes of one batch row of this cache: every layer, keys and values, at its dtype."""
        L, _, H, S, D = self.keys.shape
        return L * H * S * (D * self.keys.element_size() + self.values.shape[-1] * self.values.element_size())

    def rows_within(self, budget: int | None = None) -> int:
        """How many batch rows of this cache fit in ``budget`` bytes (default ``KV_BUDGET``),
        at least one: the batch of a forward that materialises the cache once per row (an
        expanded past is copied when the step's token is appended, a mixed cache is built)."""
        budget = KV_BUDGET if budget is None else check_int("budget", budget, low=1)
        return max(1, budget // max(1, self.row_bytes))

    def expand(self, batch: int) -> "KVCache":
        """The batch-1 cache seen as ``batch`` identical rows (a view, no copy): the past of a
        batched forward whose rows share a context. ``batch``: a whole number >= 1."""
        batch = check_int("expand batch", batch, low=1)
        if self.keys.shape[1] == batch:
            return self
        if self.keys.shape[1] != 1:
            raise InputError(f"expand(batch={batch}) needs a batch-1 cache; this one has {self.keys.shape[1]} rows")
        keys = self.keys.expand(-1, batch, -1, -1, -1)
        origin = keys if self.origin_keys is self.keys else self.origin_keys.expand(-1, batch, -1, -1, -1)
        return replace(self, keys=keys, values=self.values.expand(-1, batch, -1, -1, -1), origin_keys=origin)

    def relabel(self, segment: str) -> "KVCache":
        """The same cache with every slot labelled ``segment`` (text)."""
        if not isinstance(segment, str):
            raise InputError(f"segment={segment!r}: a slot label is text; pass a str")
        return replace(self, segments=(segment,) * len(self))

    # ------------------------------------------------------------------ RoPE
    def rope_table(self) -> tuple[torch.Tensor, int, str]:
        """``(inv_freq [L, R/2], rotary_dim, pairing)`` for the fused op (NoPE layers: zeros)."""
        return rope_table(self.rope)

    def reposition(self, delta: int | None = None, *, positions=None, backend: str = "auto") -> "KVCache":
        """Move keys to new positions: all by ``delta``, or each slot to ``positions[i]``.

        Rotates the original keys by (new - original) with each layer's own RoPE spec, so
        repeated moves do not accumulate error. Values do not move.
        """
        if (delta is None) == (positions is None):
            raise InputError("reposition: pass exactly one of delta= (a shift for every slot) or positions= (one per slot)")
        if positions is None:
            new = self.positions + check_int("delta", delta)
        else:
            try:
                raw = torch.as_tensor(positions)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"positions={positions!r:.60}: pass one whole-number RoPE position per slot") from None
            if raw.is_floating_point() or raw.dtype == torch.bool or raw.is_complex():
                raise InputError(f"positions: RoPE positions must be integers, got {raw.dtype}")
            new = raw.to(torch.int64).reshape(-1)
        if new.shape != self.positions.shape:
            raise InputError(f"positions: {new.numel()} positions for {len(self)} slots; give one per slot")
        if len(self) and (int(new.min()) < 0 or int(new.max()) >= self.max_positions):
            raise PositionError(
                f"the move places keys at positions {int(new.min())}..{int(new.max())}, outside the model's "
                f"0..{self.max_positions - 1}; shorten the context or move by less"
            )
        for s in self.rope:
            s.check()
        check_positions(self.rope, torch.cat([self.origin_positions, new]), "reposition",
                        self.fingerprint.get("model_type", ""))
        inv, rotary_dim, pairing = self.rope_table()
        out = torch.empty_like(self.origin_keys)
        rotate_keys(self.origin_keys, new - self.origin_positions, inv, rotary_dim=rotary_dim, pairing=pairing,
                    dst=out, backend=backend, offset=rope_offset(self.rope))
        return replace(self, keys=out, positions=new)


def write_slots(keys: torch.Tensor, values: torch.Tensor, source, src_slots, dst_slots) -> None:
    """The one way notekv writes freshly computed slots into stacked K/V: for every layer
    ``l``, ``keys[l][:, :, dst_slots] = source K[:, :, src_slots]`` (values alike), in place.

    ``keys``/``values``: ``[L, B, H_kv, S, D]`` buffers the caller owns; ``source``: anything
    with ``layer_kv(l) -> (keys, values)`` (a :class:`~notekv.Run`, a :class:`KVCache`);
    ``src_slots``/``dst_slots``: slices or int64 index tensors of equal length.
    """
    for l in range(keys.shape[0]):
        k, v = source.layer_kv(l)
        keys[l][:, :, dst_slots] = k[:, :, src_slots]
        values[l][:, :, dst_slots] = v[:, :, src_slots]
