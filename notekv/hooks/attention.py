"""notekv's attention function, registered through transformers' attention interface.

It computes eager attention and exposes its internals (post-RoPE q, masked scores, the
pattern) to the hook layer. (Knockout does not need it: it edits the attention mask.) It is registered on first use
(never at import) and selected only while a HookLayer needs an attention internal; the
HookLayer attaches a per-module handler for the duration of its context, so no state is
global. Layers without a handler compute plain eager attention.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..model.attnmath import scaled_scores

IMPLEMENTATION = "notekv"
_registered = False


class KnockoutError(InputError):
    """A knockout that leaves some query with no key to attend to."""


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def notekv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with hook points. Shapes: query ``[B, Hq, Sq, D]``, key/value
    ``[B, Hkv, Sk, D]`` (post-RoPE, whole cache); returns ``([B, Sq, Hq, D], pattern)``.

    Attention sinks (GPT-OSS: one learned logit per query head, passed as ``s_aux``) join the
    softmax as an extra key with no value, as HF's eager GPT-OSS attention computes them;
    ``attn.scores`` holds the real keys' scores and ``attn.pattern`` the probabilities of the
    real keys, whose rows then sum to less than 1 (the rest went to the sink)."""
    sinks = kwargs.get("s_aux")
    handler = getattr(module, "_notekv_attention", None)
    if handler is not None:
        query = handler.apply("attn.q", query)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, groups)
    v = _repeat_kv(value, groups)
    scores = scaled_scores(torch.matmul(query, k.transpose(2, 3)), scaling, softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    if handler is not None:
        scores = handler.apply("attn.scores", scores)
    if sinks is None:
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        probs = sink_softmax(scores, sinks).to(query.dtype)
    if handler is not None:
        probs = handler.apply("attn.pattern", probs)
    if dropout and module.training:
        probs = nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def sink_softmax(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores [B, H, Sq, Sk]`` with one sink logit per head (``sinks [H]``) as an
    extra column, the sink's column dropped (HF's eager GPT-OSS arithmetic, max subtracted)."""
    b, h, sq, _ = scores.shape
    both = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(b, h, sq, 1).to(scores.dtype)], dim=-1)
    both = both - both.max(dim=-1, keepdim=True).values
    return nn.functional.softmax(both, dim=-1, dtype=both.dtype)[..., :-1]


def ensure_registered() -> None:
    """Register the attention function and its (eager, additive) mask with transformers."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, notekv_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    _registered = True
