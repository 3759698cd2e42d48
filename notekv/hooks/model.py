"""``HookedModel``: an HF causal LM + tokenizer + ArchSpec, driven through the hook layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import torch
from torch import nn

from ..model.arch import ArchSpec, arch_spec
from ..model.load import weight_digest
from .interventions import Collect, Intervention
from .layer import HookLayer
from .positions import TokenView
from .run import Run, copy_cache
from .sites import Site, site


@dataclass
class Generation:
    """Output of :meth:`HookedModel.generate`: text and ids of the new tokens, the full ids
    ``[B, S_prompt + n_new]``, the cache after the last step and per-step collections."""

    text: str
    new_ids: torch.Tensor
    ids: torch.Tensor
    kv: object
    acts: dict[str, list[torch.Tensor]]


class HookedModel:
    """A loaded model. ``hf`` is the plain transformers module; nothing is patched on it
    outside a :meth:`hooks` context."""

    def __init__(self, hf: nn.Module, tokenizer, name: str = "model"):
        self.hf = hf
        self.tokenizer = tokenizer
        self.name = name
        self.spec: ArchSpec = arch_spec(hf)

    def __repr__(self) -> str:
        s = self.spec
        return (f"HookedModel({self.name!r}, {s.model_type}, layers={s.n_layers}, d={s.d_model}, "
                f"heads={s.n_heads}q/{s.n_kv_heads}kv, head_dim={s.head_dim})")

    @cached_property
    def fingerprint(self) -> dict:
        """Identifies the computation: architecture, config hash and a weight digest."""
        return {"model_type": self.spec.model_type, "config_hash": self.spec.config_hash,
                "weights": weight_digest(self.hf)}

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
            raise ValueError(f"{word!r} is {len(ids)} tokens {ids}, not one")
        return ids[0]

    def encode(self, inputs, start: int = 0) -> tuple[torch.Tensor, TokenView | None]:
        """``(ids [B, S], view)`` of text, equal-length texts, a TokenView or ids (tensor or
        list of ints); text gets BOS only when ``start == 0`` (a fresh prompt)."""
        return self._inputs(inputs, start)

    def _inputs(self, inputs, start: int) -> tuple[torch.Tensor, TokenView | None]:
        if isinstance(inputs, TokenView):
            return torch.tensor([inputs.ids]), inputs
        if isinstance(inputs, str):
            view = self.tokenize(inputs, start=start)
            return torch.tensor([view.ids]), view
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs[None]
            return ids.long(), None
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], int):
            return torch.tensor([list(inputs)]), None
        if isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], str):
            views = [self.tokenize(t, start=start) for t in inputs]
            lengths = {len(v) for v in views}
            if len(lengths) != 1:
                raise ValueError(
                    f"batched prompts tokenize to different lengths {sorted(lengths)}; notekv aligns "
                    "positions across the batch, so pass prompts of equal token length (or run them one by one)"
                )
            return torch.tensor([v.ids for v in views]), views[0]
        raise TypeError(f"inputs must be str, list[str], TokenView or ids, not {type(inputs).__name__}")

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

    def run(self, inputs, *, collect: Iterable[str | Site] = (), interventions: Sequence[Intervention] = (),
            past=None, positions: int | torch.Tensor | None = None, logits: str = "all") -> Run:
        """One forward pass with hooks.

        ``inputs``: text, equal-length texts, a TokenView or ids ``[B, S]``. ``past``: a
        transformers cache, a Run or a KVCache to continue from (never modified).
        ``positions``: RoPE positions of the new tokens — an int offset added to their slots,
        or explicit ``[S]`` positions (default: the slots). ``logits``: ``"all"`` or ``"last"``.
        Returns a :class:`Run` with logits ``[B, S, vocab]`` (``[B, 1, vocab]`` for last),
        the collected activations and the cache after this forward.
        """
        if hasattr(past, "check_model"):
            past.check_model(self)
        cache = copy_cache(past)
        past_len = cache.get_seq_length()
        ids, view = self._inputs(inputs, past_len)
        if past_len and view is not None and isinstance(past, Run) and past.view is not None:
            view = _joined_view(past.view, view)
        collectors = [Collect(site(s)) for s in collect]
        kw = {"logits_to_keep": 1} if logits == "last" else {}
        if positions is not None:
            slots = torch.arange(past_len, past_len + ids.shape[1])
            pos = slots + positions if isinstance(positions, int) else torch.as_tensor(positions).reshape(-1)
            if pos.numel() != ids.shape[1]:
                raise ValueError(f"{pos.numel()} positions for {ids.shape[1]} tokens")
            kw["position_ids"] = pos[None].expand(ids.shape[0], -1).to(self.device)
        with torch.no_grad(), HookLayer(self, tuple(interventions) + tuple(collectors), view) as hl:
            out = self.hf(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True, **kw)
        # The run's own collectors are registered last: their entry is the last one.
        acts = {str(c.site): hl.collected[str(c.site)][-1] for c in collectors}
        return Run(logits=out.logits, acts=acts, kv=out.past_key_values, ids=ids, view=view)

    def generate(self, prompt, *, max_new_tokens: int = 16, interventions: Sequence[Intervention] = (),
                 collect: Iterable[str | Site] = (), past=None, **kwargs) -> Generation:
        """Greedy (by default) generation through ``hf.generate`` with interventions active on
        every step; slots of generated tokens continue after the prompt. A KVCache ``past``
        is continued in a preallocated copy with room for the prompt and new tokens."""
        if hasattr(past, "check_model"):
            past.check_model(self)
        cache = copy_cache(past, room=max_new_tokens + 64)
        past_len = cache.get_seq_length()
        ids, view = self._inputs(prompt, past_len)
        if past_len:
            prefix = torch.zeros(ids.shape[0], past_len, dtype=ids.dtype)
            if isinstance(past, Run) and past.ids is not None:
                prefix = past.ids.expand(ids.shape[0], -1)
            elif hasattr(past, "token_ids"):
                prefix = past.token_ids[None].expand(ids.shape[0], -1)
            ids = torch.cat([prefix, ids], dim=1)
        collectors = [Collect(site(s)) for s in collect]
        kwargs.setdefault("do_sample", False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad(), HookLayer(self, tuple(interventions) + tuple(collectors), view) as hl:
            out = self.hf.generate(
                input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                past_key_values=cache, max_new_tokens=max_new_tokens, pad_token_id=pad,
                return_dict_in_generate=True, **kwargs,
            )
        seq = out.sequences
        new = seq[:, ids.shape[1]:]
        return Generation(
            text=self.tokenizer.decode(new[0], skip_special_tokens=True), new_ids=new, ids=seq,
            kv=out.past_key_values, acts={str(c.site): list(hl.collected[str(c.site)]) for c in collectors},
        )


def _joined_view(past: TokenView, new: TokenView) -> TokenView:
    """One view over the past prompt's text followed by the continuation."""
    shift = len(past.text)
    return TokenView(
        past.text + new.text, past.ids + new.ids, past.tokens + new.tokens,
        past.offsets + tuple((a + shift, b + shift) for a, b in new.offsets), past.start,
    )
