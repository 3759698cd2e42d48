"""Attention arithmetic, written once: the score scale, logit soft-capping and the causal
(optionally sliding-window) visibility of keys.

Every notekv path that computes or re-computes attention scores uses these: notekv's
attention function (:mod:`notekv.hooks.attention`), the knockout mask of the hook layer, the
lean forward (:mod:`notekv.lean.forward`) and KV attribution's exact key fix
(:mod:`notekv.attribution.kv`). They live on the model floor because they are facts of the
family (scale, cap, window), not of any executor.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchSpec


def scaling_of(attn: nn.Module, spec: ArchSpec) -> float:
    """The factor the attention module ``attn`` multiplies ``q . k`` by: its own ``scaling``
    attribute (Gemma's ``query_pre_attn_scalar``) or ``head_dim ** -0.5``."""
    return float(getattr(attn, "scaling", spec.head_dim ** -0.5))


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma-2 style soft-capping); ``x`` itself when ``cap`` is
    None or 0. Any shape."""
    return torch.tanh(x / cap) * cap if cap else x


def scaled_scores(dots: torch.Tensor, scaling: float, cap: float | None = None) -> torch.Tensor:
    """Pre-mask attention scores from raw dot products ``q . k`` (any shape, e.g.
    ``[B, H, Sq, Sk]``): scaled by ``scaling``, then soft-capped by ``cap``."""
    return softcap(dots * scaling, cap)


def visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Which keys each query may attend to, bool ``[Sq, Sk]``: the key at position
    ``kpos[j]`` is visible to the query at ``qpos[i]`` iff ``kpos[j] <= qpos[i]`` and, on a
    sliding-window layer, ``qpos[i] - kpos[j] < window``. ``qpos [Sq]``, ``kpos [Sk]``
    integer positions (or slots) on one device."""
    q, k = qpos[:, None], kpos[None, :]
    ok = k <= q
    if window is not None:
        ok = ok & ((q - k) < window)
    return ok


def additive_mask(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask (any shape): 0 where ``ok``, the dtype's most
    negative finite value elsewhere."""
    mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
    return mask.masked_fill_(~ok, torch.finfo(dtype).min)
