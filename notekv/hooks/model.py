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
from ..model.arch import ArchSpec, arch_spec
from ..model.load import weight_digest
from .grad import check_grad
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
    """Per HF module: the hook lock, the contexts using notekv's attention function and the
    attention implementation to restore when the last of them exits."""

    lock: threading.RLock = field(default_factory=threading.RLock)
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
    kv: "KVCache"
    acts: dict[str, list[torch.Tensor]]


class HookedModel:
    """A loaded model. ``hf`` is the plain transformers module; nothing is patched on it
    outside a :meth:`hooks` context."""

    def __init__(self, hf: nn.Module, tokenizer, name: str = "model"):
        self.hf = hf
        self.tokenizer = tokenizer
        self.name = name
        self.spec: ArchSpec = arch_spec(hf)
        # Kept on the HF module itself, so that every HookedModel wrapping it shares them:
        # one hook context at a time (threads wait; one thread may nest contexts), and the
        # contexts that switched the module to notekv's attention function.
        self.state: HookState = hf.__dict__.setdefault("_notekv_state", HookState())

    def __repr__(self) -> str:
        s = self.spec
        return (f"HookedModel({self.name!r}, {s.model_type}, layers={s.n_layers}, d={s.d_model}, "
                f"heads={s.n_heads}q/{s.n_kv_heads}kv, head_dim={s.head_dim})")

    @cached_property
    def fingerprint(self) -> dict:
        """Identifies the computation: architecture, config hash and a weight digest."""
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
        self.__dict__.pop("fingerprint", None)
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

    def to_str_tokens(self, text: str) -> list[str]:
        return list(self.tokenize(text).tokens)

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
            return torch.tensor([inputs.ids], dtype=torch.long), inputs
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
            return torch.tensor([v.ids for v in views]), views[0]
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
    def hooks(self, *interventions: Intervention, prompt: str | TokenView | None = None) -> HookLayer:
        """Context manager applying ``interventions`` to every forward inside it.

        ``prompt`` lets text selectors (``Span``, ``Delims``) resolve; without it only
        ``Pos``/``Last``/``Range`` work, resolved against the first forward's length.
        """
        view = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        return HookLayer(self, tuple(interventions), view)

    def run(self, inputs, *, collect: str | Iterable[str | Site] = (), interventions: Sequence[Intervention] = (),
            past=None, positions: int | torch.Tensor | None = None, logits: str = "all", grad: bool = False) -> Run:
        """One forward pass with hooks.

        ``inputs``: text, equal-length texts, a TokenView or ids ``[B, S]``. ``collect``: site
        strings, globs (``"L*.attn.pattern"``) or ``"all"`` (TransformerLens's
        ``run_with_cache``); a :class:`Collect` among ``interventions`` is collected alike.
        ``past``: a KVCache, a Run or a transformers cache to continue from (never modified).
        ``positions``: RoPE positions of the new tokens — an int offset added to their slots,
        or explicit ``[S]`` positions (default: the slots). ``logits``: ``"all"`` or ``"last"``.
        ``grad=True``: run with gradients from the :class:`~notekv.hooks.grad.Tap` sites among
        ``interventions`` (the weights stay frozen); ``run.grads(score)`` then gives
        ``d score / d activation`` at each tapped site.
        Returns a :class:`Run` with logits ``[B, S, vocab]`` (``[B, 1, vocab]`` for last),
        the collected activations and the cache after this forward (``Run.kv``, a KVCache).
        """
        if logits not in ("all", "last"):
            raise InputError(f"logits={logits!r}: choose 'all' (every position) or 'last' (the last token only)")
        kv = None if past is None else as_kvcache(past, self, "past")
        cache = kv.to_hf() if kv is not None else DynamicCache()
        past_len = 0 if kv is None else len(kv)
        ids, view = self._inputs(inputs, past_len)
        if past_len and view is not None and isinstance(past, Run) and past.view is not None:
            view = _joined_view(past.view, view)
        collectors = [Collect(s) for s in self.sitemap.expand(collect)] if collect else []
        ivs = tuple(interventions) + tuple(collectors)
        kw = {"logits_to_keep": 1} if logits == "last" else {}
        slots = torch.arange(past_len, past_len + ids.shape[1])
        pos = slots
        if positions is not None:
            if isinstance(positions, int):
                pos = slots + check_int("positions", positions)
            else:
                pos = torch.as_tensor(positions).reshape(-1)
                if pos.is_floating_point():
                    raise InputError(f"positions: RoPE positions must be integers, got {pos.dtype}")
            if pos.numel() != ids.shape[1]:
                raise InputError(f"positions: {pos.numel()} positions for {ids.shape[1]} tokens")
            limit = self.spec.max_positions
            if pos.numel() and (int(pos.min()) < 0 or (limit and int(pos.max()) >= limit)):
                raise InputError(f"positions run {int(pos.min())}..{int(pos.max())}, outside {self.name}'s RoPE "
                                 f"positions 0..{limit - 1}")
            kw["position_ids"] = pos[None].expand(ids.shape[0], -1).to(self.device)
        check_grad(grad, ivs, "model.run")
        with torch.set_grad_enabled(grad), HookLayer(self, ivs, view, horizon=past_len + ids.shape[1]) as hl:
            out = self.hf(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True, **kw)
        # One forward: each collected site has one entry.
        keys = dict.fromkeys(iv.collects for iv in ivs if iv.collects)
        acts = {k: hl.collected[k][-1] for k in keys if hl.collected[k]}
        hf_cache = out.past_key_values
        hf_cache._notekv_fingerprint = self.fingerprint
        meta = _slot_meta(kv, pos, ids)
        run = Run(logits=out.logits, acts=acts, ids=ids, view=view, hf_cache=hf_cache, fingerprint=self.fingerprint,
                  kv_factory=lambda: self._kv_of(hf_cache, meta))
        run.slot_meta = meta
        run.start = past_len
        run.taps = dict(hl.taps)
        return run

    def _kv_of(self, hf_cache, meta):
        from ..kv import KVCache

        positions, token_ids, segments = meta
        return KVCache.from_hf(hf_cache, self, token_ids, positions=positions, segments=segments)

    def generate(self, prompt, *, max_new_tokens: int = 16, interventions: Sequence[Intervention] = (),
                 collect: Iterable[str | Site] = (), past=None, **kwargs) -> Generation:
        """Greedy (by default) generation through ``hf.generate`` with interventions active on
        every step; slots of generated tokens continue after the prompt. A KVCache ``past``
        is continued in a preallocated copy with room for the prompt and new tokens."""
        check_int("max_new_tokens", max_new_tokens, low=1)
        kv = None if past is None else as_kvcache(past, self, "past")
        cache = kv.to_hf(room=max_new_tokens + 64) if kv is not None else DynamicCache()
        past_len = 0 if kv is None else len(kv)
        ids, view = self._inputs(prompt, past_len)
        if past_len:  # ids the cache does not record (-1) are never embedded: they are cached
            prefix = kv.token_ids.clamp(min=0)[None].expand(ids.shape[0], -1).to(ids.dtype)
            ids = torch.cat([prefix, ids], dim=1)
        collectors = [Collect(s) for s in self.sitemap.expand(collect)] if collect else []
        kwargs.setdefault("do_sample", False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        horizon = ids.shape[1] + max_new_tokens
        with torch.no_grad(), HookLayer(self, tuple(interventions) + tuple(collectors), view, horizon=horizon) as hl:
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
        meta = _slot_meta(kv, torch.arange(past_len, n_cached), fresh)
        return Generation(
            text=self.tokenizer.decode(new[0], skip_special_tokens=True), new_ids=new, ids=seq,
            kv=self._kv_of(hf_cache, meta), acts={str(c.site): list(hl.collected[str(c.site)]) for c in collectors},
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
    """One view over the past prompt's text followed by the continuation."""
    shift = len(past.text)
    return TokenView(
        past.text + new.text, past.ids + new.ids, past.tokens + new.tokens,
        past.offsets + tuple((a + shift, b + shift) for a, b in new.offsets), past.start,
    )
