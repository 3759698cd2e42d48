"""``HookedModel``: an HF causal LM + tokenizer + ArchSpec, driven through the hook layer."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import InputError, check_device, check_dtype, check_int
from ..kv.cache import PositionError
from ..kv.hf import empty_cache
from ..model.arch import ArchSpec, arch_spec
from ..model.load import PROVENANCE_KEY, Provenance, weight_digest
from .grad import check_grad
from .hybrid import as_past
from .interventions import Collect, Intervention
from .layer import HookLayer
from .plan import Plan, compile_plan
from .positions import TokenView
from .run import Run, as_kvcache
from .sitemap import SiteMap
from .sites import Site

if TYPE_CHECKING:
    from ..kv import KVCache


@dataclass
class HookState:
    """Per HF module: the hook lock, the hook contexts entered (in entry order), those using
    notekv's attention function and the attention implementation to restore when the last
    of them exits."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    contexts: list = field(default_factory=list)
    attention_users: list = field(default_factory=list)
    saved_attention: str | None = None

    def __deepcopy__(self, memo) -> "HookState":  # a copied module starts with no contexts
        return HookState()

    def __reduce__(self):
        return (HookState, ())


@dataclass
class Generation:
    """Output of :meth:`HookedModel.generate`: text and ids of the new tokens, the full ids
    ``[B, S_prompt + n_new]``, the cache after the last step and per-step collections."""

    text: str
    new_ids: torch.Tensor
    ids: torch.Tensor
    kv: "KVCache | None"  # None on a hybrid (state-space layers): no KVCache holds its cache
    acts: dict[str, list[torch.Tensor]]


class HookedModel:
    """A loaded model. ``hf`` is the plain transformers module; nothing is patched on it
    outside a :meth:`hooks` context."""

    def __init__(self, hf: nn.Module, tokenizer, name: str = "model", *, provenance: Provenance | None = None):
        self.hf = hf
        self.tokenizer = tokenizer
        self.name = name
        self.spec: ArchSpec = arch_spec(hf)
        #: Where the weights came from (:class:`~notekv.model.load.Provenance`): what
        #: :func:`notekv.load` read (file, GGUF quantization, the dtype it was dequantized
        #: to and loaded in); ``str(model.provenance)`` is the one-line label,
        #: ``model.provenance.to_dict()`` the record.
        self.provenance: Provenance = provenance or hf.__dict__.get(PROVENANCE_KEY) or Provenance(
            source=f"in memory ({type(hf).__name__})", format="memory", dtype=str(self.dtype).removeprefix("torch."))
        # Kept on the HF module itself, so that every HookedModel wrapping it shares them:
        # one hook context at a time (threads wait; one thread may nest contexts), and the
        # contexts that switched the module to notekv's attention function.
        self.state: HookState = hf.__dict__.setdefault("_notekv_state", HookState())

    def __repr__(self) -> str:
        s = self.spec
        return (f"HookedModel({self.name!r}, {s.model_type}, layers={s.n_layers}, d={s.d_model}, "
                f"heads={s.n_heads}q/{s.n_kv_heads}kv, head_dim={s.head_dim}, dtype={self.dtype_name}, "
                f"weights={str(self.provenance)!r})")

    @property
    def fingerprint(self) -> dict:
        """Identifies the computation: architecture, config hash and a digest of every byte
        of every weight with its dtype and shape (:func:`~notekv.model.load.weight_digest`).
        It follows the module, not this wrapper: an in-place edit, a replaced tensor or a cast
        changes it for every HookedModel wrapping the module. Each access checks every
        weight's storage and version counter (microseconds per tensor) and reads again only
        the weights that changed."""
        return {"model_type": self.spec.model_type, "config_hash": self.spec.config_hash,
                "weights": weight_digest(self.hf)}

    @cached_property
    def sitemap(self) -> SiteMap:
        """Where every site of this model lives, per executor (see :mod:`notekv.hooks.sitemap`)."""
        return SiteMap(self.spec)

    def plan(self, *interventions: Intervention) -> Plan:
        """The plan ``interventions`` compile to on this model (for inspection; ``hooks`` and
        ``run`` compile their own)."""
        return compile_plan(self, interventions)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "HookedModel":
        """Move (or cast) the model in place and return it. Caches and runs computed before a
        cast belong to the old dtype's computation and are refused afterwards (the fingerprint
        follows the weights). A model dispatched by accelerate (``device_map``) is placed by
        accelerate: reload it with another map instead."""
        if getattr(self.hf, "hf_device_map", None) and len(set(self.hf.hf_device_map.values())) > 1:
            raise InputError(f"{self.name} is dispatched by accelerate over {sorted(set(map(str, self.hf.hf_device_map.values())))}; "
                             "load it again with another device_map instead of moving it")
        dtype = None if dtype is None else check_dtype(dtype)
        device = None if device is None else check_device(device)
        self.hf.to(device=device, dtype=dtype)
        self._lean_engine = None
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as outputs record it: ``"float32"``, ``"bfloat16"``, ``"float16"``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, *, start: int = 0, special: bool | None = None) -> TokenView:
        """Tokenize ``text``; special tokens (BOS) only for a fresh prompt (``start == 0``)."""
        return TokenView.from_text(self.tokenizer, text, start=start,
                                   special=(start == 0) if special is None else special)

    def to_str_tokens(self, inputs) -> list[str] | list[list[str]]:
        """The token strings of ``inputs`` as TransformerLens's ``to_str_tokens``: text (BOS
        included for a fresh prompt, as ``model.run`` reads it) or ids (``[S]``, ``[1, S]``, a
        list of ints) give one list; a list of texts or ids ``[B, S]`` one list per row."""
        if isinstance(inputs, str):
            return list(self.tokenize(inputs).tokens)
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
            return [list(self.tokenize(t).tokens) for t in inputs]
        ids, _ = self.encode(inputs)
        rows = [[self.tokenizer.decode([int(i)]) for i in row] for row in ids.tolist()]
        return rows[0] if len(rows) == 1 else rows

    def to_tokens(self, inputs) -> torch.Tensor:
        """Token ids ``[B, S]`` on the model's device, exactly as ``model.run`` reads
        ``inputs`` (text gets BOS when the tokenizer adds one for a fresh prompt, as
        TransformerLens's ``to_tokens``; a list of texts must tokenize to equal lengths)."""
        return self.encode(inputs)[0].to(self.device)

    def __call__(self, inputs, **kwargs) -> torch.Tensor:
        """The logits ``[B, S, vocab]`` of ``inputs``, as TransformerLens's ``model(text)``:
        ``model.run(inputs, **kwargs).logits`` (``interventions=``, ``past=`` ... as in
        :meth:`run`)."""
        return self.run(inputs, **kwargs).logits

    def run_with_cache(self, inputs, *, collect: str | Iterable[str | Site] = "all", **kwargs) -> tuple[torch.Tensor, Run]:
        """``(logits, run)`` as TransformerLens's ``run_with_cache``: one forward collecting
        every site (``collect="all"``: ``model.run(inputs, collect="all")``; or the sites /
        globs given). ``run`` is the :class:`Run`: ``run["blocks.3.attn.hook_z"]`` gives a
        site by its TransformerLens name in TransformerLens's layout (``[B, S, H, D]``),
        ``run["L3.attn.z"]`` in notekv's (``[B, H, S, D]``); ``run.kv`` is the KV cache, and
        the Run is a :class:`~notekv.Patch` source."""
        run = self.run(inputs, collect=collect, **kwargs)
        return run.logits, run

    def token_id(self, word: str) -> int:
        """The id of ``word`` if it is a single token (raises otherwise)."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{word!r} is {len(ids)} tokens {ids}, not one; pass a word that is a single token (or its id)")
        return ids[0]

    def encode(self, inputs, start: int = 0) -> tuple[torch.Tensor, TokenView | None]:
        """``(ids [B, S], view)`` of text, equal-length texts, a TokenView or ids (tensor or
        list of ints); text gets BOS only when ``start == 0`` (a fresh prompt)."""
        return self._inputs(inputs, start)

    def _inputs(self, inputs, start: int) -> tuple[torch.Tensor, TokenView | None]:
        ids, view = self._parse_inputs(inputs, start)
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise InputError(f"inputs: {inputs!r:.60} holds no tokens (shape {tuple(ids.shape)}); pass a non-empty "
                             "prompt (text that tokenizes to at least one token, or ids [B, S] with S >= 1)")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise InputError(f"inputs: token ids must be integers, got a {ids.dtype} tensor")
        vocab = self.spec.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"inputs: token id {lo if lo < 0 else hi} is outside {self.name}'s vocabulary 0..{vocab - 1}")
        return ids, view

    def _parse_inputs(self, inputs, start: int) -> tuple[torch.Tensor, TokenView | None]:
        if isinstance(inputs, TokenView):
            rows = inputs.row_views()
            if len({len(v) for v in rows}) != 1:
                raise InputError(f"inputs: the TokenView's rows have different lengths {sorted({len(v) for v in rows})}; "
                                 "pass rows of equal token length")
            return torch.tensor([v.ids for v in rows], dtype=torch.long), inputs
        if isinstance(inputs, str):
            if not inputs:
                raise InputError("inputs: the prompt is an empty string; pass text to run (a lone BOS is "
                                 "model.run([model.tokenizer.bos_token_id]))")
            view = self.tokenize(inputs, start=start)
            return torch.tensor([view.ids], dtype=torch.long).reshape(1, -1), view
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs.reshape(1, -1)
            return (ids if ids.is_floating_point() else ids.long()), None
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in inputs):
            return torch.tensor([list(inputs)], dtype=torch.long), None
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (list, tuple)):
            lengths = {len(r) for r in inputs}
            if len(lengths) != 1:
                raise InputError(f"inputs: batched ids have different lengths {sorted(lengths)}; pass rows of equal length")
            return torch.tensor([list(r) for r in inputs], dtype=torch.long), None
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
            views = [self.tokenize(t, start=start) for t in inputs]
            lengths = {len(v) for v in views}
            if len(lengths) != 1:
                raise InputError(
                    f"inputs: batched prompts tokenize to different lengths {sorted(lengths)}; notekv aligns "
                    "positions across the batch, so pass prompts of equal token length (or run them one by one)"
                )
            return torch.tensor([v.ids for v in views]), TokenView.batch(views)
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise InputError("inputs: an empty list; pass text, a list of texts, a TokenView or token ids")
        raise InputError(f"inputs: expected str, list[str], TokenView or token ids, not {type(inputs).__name__} "
                         f"{inputs!r:.60}")

    def lean(self, capacity: int, *, mode: str | None = None):
        """This model's :class:`~notekv.lean.LeanEngine` with room for ``capacity`` slots,
        emptied (reused while large enough). ``mode``: ``"graph"`` (CUDA graphs, default on
        CUDA), ``"static"`` or ``"eager"`` (default elsewhere)."""
        from ..lean import engine_for

        return engine_for(self, capacity, mode=mode)

    def release_lean(self) -> None:
        """Drop the lean engine (its buffers and CUDA graphs), if one was made."""
        self._lean_engine = None

    # ------------------------------------------------------------------ hooks
    def hooks(self, *interventions: Intervention, prompt: str | Sequence[str] | TokenView | None = None) -> HookLayer:
        """Context manager applying ``interventions`` to every forward inside it.

        ``prompt`` lets text selectors (``Span``, ``Delims``) resolve; without it only
        ``Pos``/``Last``/``Range`` work, resolved against the first forward's length. A list
        of texts gives each batch row its own prompt. A forward whose tokens differ from the
        prompt's at the prompt's slots is refused (its positions were found in another text).
        A ``model.run`` / ``model.generate`` inside the context is steered by it too, except
        from inside a Hook function, where it sees only its own interventions.
        """
        if isinstance(prompt, str):
            view = self.tokenize(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            view = TokenView.batch([self.tokenize(p) for p in prompt])
        elif prompt is None or isinstance(prompt, TokenView):
            view = prompt
        else:
            raise InputError(f"prompt: expected text, a list of texts (one per batch row) or a TokenView, not "
                             f"{type(prompt).__name__} {prompt!r:.60}")
        return HookLayer(self, tuple(interventions), view)

    def run(self, inputs, *, collect: str | Iterable[str | Site] = (), interventions: Sequence[Intervention] = (),
            past=None, positions: int | torch.Tensor | None = None, logits: str = "all", grad: bool = False) -> Run:
        """One forward pass with hooks.

        ``inputs``: text, equal-length texts (each row's selectors resolve against its own
        text), a TokenView or ids ``[B, S]``. ``collect``: site strings, globs
        (``"L*.attn.pattern"``) or ``"all"`` (TransformerLens's ``run_with_cache``); a
        :class:`Collect` among ``interventions`` is collected alike.
        ``past``: a KVCache, a Run or a transformers cache to continue from (never modified).
        ``positions``: RoPE positions of the new tokens — an int offset added to their slots,
        or explicit ``[S]`` positions. By default new tokens continue after the cache's last
        RoPE position (their slots for a cache that was never moved; ``positions[-1] + 1 ..``
        for a repositioned one); a cache whose positions do not run contiguously needs
        ``positions=``. Every position must lie inside the model's (:class:`PositionError`).
        ``logits``: ``"all"`` or ``"last"``.
        ``grad=True``: run with gradients from the :class:`~notekv.hooks.grad.Tap` sites among
        ``interventions`` (the weights stay frozen); ``run.grads(score)`` then gives
        ``d score / d activation`` at each tapped site.
        Selectors name slots of this forward's tokens: one naming a slot of ``past`` is refused
        (except on ``kv.*`` sites, :class:`~notekv.KVPatch` and a knockout's ``src``). Inside
        a ``model.hooks`` context the context applies too; called from a Hook function, this
        forward sees only its own interventions.
        Returns a :class:`Run` with logits ``[B, S, vocab]`` (``[B, 1, vocab]`` for last),
        the collected activations and the cache after this forward (``Run.kv``, a KVCache).
        """
        if logits not in ("all", "last"):
            raise InputError(f"logits={logits!r}: choose 'all' (every position) or 'last' (the last token only)")
        kv = None if past is None else as_past(past, self, "past")  # a KVCache (a StatePast on hybrids)
        fingerprint = self.fingerprint
        cache = kv.to_hf() if kv is not None else empty_cache(self)
        past_len = 0 if kv is None else len(kv)
        ids, view = self._inputs(inputs, past_len)
        if past_len and view is not None and isinstance(past, Run) and past.view is not None:
            view = _joined_view(past.view, view)
        collectors = [Collect(s) for s in self.sitemap.expand(collect)] if collect else []
        ivs = tuple(interventions) + tuple(collectors)
        kw = {"logits_to_keep": 1} if logits == "last" else {}
        slots = torch.arange(past_len, past_len + ids.shape[1])
        pos = self._positions(kv, ids.shape[1], positions)
        if not torch.equal(pos, slots) or self.spec.layout.explicit_positions:  # Qwen2.5-VL's rope_deltas
            kw["position_ids"] = pos[None].expand(ids.shape[0], -1).to(self.device)
        check_grad(grad, ivs, "model.run")
        with torch.set_grad_enabled(grad), HookLayer(self, ivs, view, horizon=past_len + ids.shape[1],
                                                     isolate=True) as hl:
            out = self.hf(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True, **kw)
        # One forward: each collected site has one entry.
        keys = dict.fromkeys(iv.collects for iv in ivs if iv.collects)
        acts = {k: hl.collected[k][-1] for k in keys if hl.collected[k]}
        hf_cache = out.past_key_values
        hf_cache._notekv_fingerprint = fingerprint
        meta = _slot_meta(kv, pos, ids)
        run = Run(logits=out.logits, acts=acts, ids=ids, view=view, hf_cache=hf_cache, fingerprint=fingerprint,
                  kv_factory=lambda: self._kv_of(hf_cache, meta))
        run.slot_meta = meta
        run.start = past_len
        run.sitemap = self.sitemap
        run.taps = dict(hl.taps)
        return run

    def _positions(self, kv, n: int, positions=None, *, extra: int = 0, what: str = "model.run") -> torch.Tensor:
        """RoPE positions ``[n]`` of ``n`` new tokens after ``kv`` (None: none): ``positions``
        as :meth:`run` takes it, or by default after the cache's last position. ``extra``
        more tokens follow (generate's new tokens) and must fit the model's positions too."""
        past_len = 0 if kv is None else len(kv)
        slots = torch.arange(past_len, past_len + n)
        if positions is None:
            pos = slots
            if past_len:
                p = kv.positions.cpu().to(torch.int64)
                first = int(p[0])
                if not torch.equal(p, torch.arange(first, first + past_len)):
                    raise PositionError(
                        f"past: the cache's {past_len} slots sit at RoPE positions that do not run contiguously "
                        f"({_brief_positions(p)}), so where new tokens go is ambiguous; pass positions= to "
                        f"model.run (e.g. positions={int(p.max()) + 1 - past_len}, an offset that places them "
                        "after the cache's largest position), or reposition the cache to contiguous positions first"
                    )
                pos = slots + first  # after the cache's last position, first + past_len - 1
        elif isinstance(positions, int):
            pos = slots + check_int("positions", positions)
        else:
            pos = torch.as_tensor(positions).reshape(-1)
            if pos.is_floating_point() or pos.dtype == torch.bool:
                raise InputError(f"positions: RoPE positions must be integers, got {pos.dtype}")
            pos = pos.cpu().to(torch.int64)
            if pos.numel() != n:
                raise InputError(f"positions: {pos.numel()} positions for {n} tokens")
        limit = self.spec.max_positions
        hi = int(pos.max()) + extra if pos.numel() else -1
        if pos.numel() and int(pos.min()) < 0:
            raise PositionError(f"positions run {int(pos.min())}..{int(pos.max())}, outside {self.name}'s RoPE "
                                f"positions 0..{limit - 1 if limit else '?'}; RoPE positions are never negative")
        if limit and hi >= limit:
            if positions is not None:
                raise PositionError(f"positions run {int(pos.min())}..{hi}, outside {self.name}'s RoPE positions "
                                    f"0..{limit - 1}; place the tokens at positions below {limit}")
            more = f" and {extra} new tokens" if extra else ""
            after = f" after a cache of {past_len} slots" if past_len else ""
            raise PositionError(
                f"{what}: {n} prompt tokens{more}{after} reach RoPE position {hi}, outside {self.name}'s "
                f"{limit} positions (0..{limit - 1}); shorten the prompt{' or max_new_tokens' if extra else ''}"
                f"{' or the cache' if past_len else ''} to {limit} positions in all"
            )
        return pos

    def _kv_of(self, hf_cache, meta):
        from ..kv import KVCache

        positions, token_ids, segments = meta
        return KVCache.from_hf(hf_cache, self, token_ids, positions=positions, segments=segments)

    def generate(self, prompt, *, max_new_tokens: int = 16, interventions: Sequence[Intervention] = (),
                 collect: Iterable[str | Site] = (), past=None, **kwargs) -> Generation:
        """Greedy (by default) generation through ``hf.generate`` with interventions active on
        every step; slots of generated tokens continue after the prompt. A KVCache ``past``
        is continued in a preallocated copy with room for the prompt and new tokens; the new
        tokens' RoPE positions continue after the cache's last one (a cache whose positions
        do not run contiguously is refused). The prompt and the new tokens must fit the
        model's positions (:class:`PositionError`)."""
        check_int("max_new_tokens", max_new_tokens, low=1)
        kv = None if past is None else as_kvcache(past, self, "past")
        past_len = 0 if kv is None else len(kv)
        ids, view = self._inputs(prompt, past_len)
        pos = self._positions(kv, ids.shape[1], extra=max_new_tokens - 1, what="model.generate")
        offset = int(pos[0]) - past_len
        cache = kv.to_hf(room=max_new_tokens + 64) if kv is not None else empty_cache(self)
        if past_len:  # ids the cache does not record (-1) are never embedded: they are cached
            prefix = kv.token_ids.clamp(min=0)[None].expand(ids.shape[0], -1).to(ids.dtype)
            ids = torch.cat([prefix, ids], dim=1)
        collectors = [Collect(s) for s in self.sitemap.expand(collect)] if collect else []
        kwargs.setdefault("do_sample", False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        horizon = ids.shape[1] + max_new_tokens
        with torch.no_grad(), HookLayer(self, tuple(interventions) + tuple(collectors), view, horizon=horizon,
                                        isolate=True, position_offset=offset) as hl:
            out = self.hf.generate(
                input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                past_key_values=cache, max_new_tokens=max_new_tokens, pad_token_id=pad,
                return_dict_in_generate=True, **kwargs,
            )
        seq = out.sequences
        new = seq[:, ids.shape[1]:]
        hf_cache = out.past_key_values
        n_cached = hf_cache.get_seq_length()  # the last generated token is not in the cache
        fresh = seq[:, past_len:n_cached]
        meta = _slot_meta(kv, torch.arange(past_len, n_cached) + offset, fresh)
        return Generation(
            text=self.tokenizer.decode(new[0], skip_special_tokens=True), new_ids=new, ids=seq,
            kv=self._kv_of(hf_cache, meta) if self.spec.kv_refusal is None else None,
            acts={str(c.site): list(hl.collected[str(c.site)]) for c in collectors},
        )


def _slot_meta(past, positions: torch.Tensor, ids: torch.Tensor):
    """``(positions, token_ids, segments)`` of every slot after a forward of ``ids [B, S]`` at
    ``positions [S]`` over ``past`` (a KVCache or None)."""
    n = ids.shape[1]
    if past is None:
        return positions.cpu().to(torch.int64), ids[0].cpu(), ("",) * n
    return (torch.cat([past.positions.cpu(), positions.cpu().to(torch.int64)]), torch.cat([past.token_ids.cpu(), ids[0].cpu()]),
            tuple(past.segments) + ("",) * n)


def _joined_view(past: TokenView, new: TokenView) -> TokenView:
    """One view over the past prompt's text followed by the continuation (row by row for a
    batch of different texts)."""
    if past.rows or new.rows:
        b = max(len(past.rows), len(new.rows))
        olds, news = past.row_views(b), new.row_views(b)
        if len(olds) != len(news):
            raise InputError(f"inputs: {len(news)} rows of text continue a past Run of {len(olds)} different texts; "
                             "pass one continuation per row of the past")
        return TokenView.batch([_joined_view(a, c) for a, c in zip(olds, news)])
    shift = len(past.text)
    return TokenView(
        past.text + new.text, past.ids + new.ids, past.tokens + new.tokens,
        past.offsets + tuple((a + shift, b + shift) for a, b in new.offsets), past.start,
    )


def _brief_positions(p: torch.Tensor) -> str:
    v = p.tolist()
    return ", ".join(map(str, v)) if len(v) <= 8 else ", ".join(map(str, v[:4])) + ", ..., " + ", ".join(map(str, v[-3:]))
