"""Layouts: the views between a module value and notekv's shapes.

An :class:`~notekv.hooks.sitemap.Access` names one of these; every executor converts with
:func:`to_site` and writes back with :func:`from_site`. :func:`module_view` goes the other
way for the layouts that are views (``plain``, ``swap``): it hands a site addressed by its
TransformerLens name to a hook function in TransformerLens's layout, sharing storage, so that
in-place edits land in notekv's tensor.

========== ==========================================================================
layout     the module value (notekv's side is ``[B, S, d]`` or ``[B, H, S, D]``)
========== ==========================================================================
plain      already in notekv's layout (identity)
first      a tuple output whose first element is the activation
swap       ``[B, S, H, D]`` (TransformerLens's hooks) <-> ``[B, H, S, D]``
heads_q    ``[B, S, H_q * D]`` (or ``[B, S, H_q, D]``) split into query heads
heads_kv   the same with KV heads
fused0|1|2 q / k / v of GPT-NeoX's per-head fused projection ``[B, S, H * 3D]``
flat0|1|2  q / k / v of a flat fused projection ``[B, S, H_q*D + 2 * H_kv*D]`` laid out
           ``[q | k | v]`` (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``)
rope_q|k   element 0 / 1 of the ``(q, k)`` tuple ``apply_rotary_pos_emb`` returns
logits     the ``logits`` field of a CausalLM's output object (after the head's scale or cap)
========== ==========================================================================
"""

from __future__ import annotations

import torch

from ..model.arch import ArchSpec

LAYOUTS = ("plain", "first", "swap", "heads_q", "heads_kv", "fused0", "fused1", "fused2", "flat0", "flat1", "flat2",
           "rope_q", "rope_k", "logits")


def _flat_span(layout: str, spec: ArchSpec) -> tuple[int, int, int]:
    """``(start, stop, heads)`` of q / k / v (``flat0|1|2``) in the last axis of a flat
    ``[q | k | v]`` projection."""
    i, d = int(layout[-1]), spec.head_dim
    q, kv = spec.n_heads * d, spec.n_kv_heads * d
    start = (0, q, q + kv)[i]
    return start, start + (q if i == 0 else kv), spec.n_heads if i == 0 else spec.n_kv_heads


def _unknown(layout: str) -> ValueError:
    # An Access built with a layout this module does not know: a bug in a route builder.
    return ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def to_site(layout: str, raw, spec: ArchSpec, heads: int | None = None) -> torch.Tensor:
    """The notekv-layout tensor of module value ``raw`` (a view sharing storage where possible)."""
    if layout == "plain":
        return raw
    if layout == "first":
        return raw[0] if isinstance(raw, tuple) else raw
    if layout == "swap":
        return raw.transpose(1, 2)
    if layout in ("heads_q", "heads_kv"):
        b, s = raw.shape[:2]
        h = spec.n_heads if layout == "heads_q" else spec.n_kv_heads
        return raw.view(b, s, h, -1).transpose(1, 2)  # the head size follows (MLA: V's for attn.z)
    if layout.startswith("fused"):
        i, d = int(layout[-1]), spec.head_dim
        b, s = raw.shape[:2]
        return raw.view(b, s, spec.n_heads, 3 * d)[..., i * d : (i + 1) * d].transpose(1, 2)
    if layout.startswith("flat"):
        start, stop, h = _flat_span(layout, spec)
        b, s = raw.shape[:2]
        return raw[..., start:stop].unflatten(-1, (h, spec.head_dim)).transpose(1, 2)
    if layout in ("rope_q", "rope_k"):
        return raw[0 if layout == "rope_q" else 1]
    if layout == "logits":
        return raw.logits
    raise _unknown(layout)


def from_site(layout: str, raw, new: torch.Tensor, spec: ArchSpec):
    """``raw`` with its notekv-layout view replaced by ``new`` (the inverse of :func:`to_site`)."""
    if layout == "plain":
        return new
    if layout == "first":
        return (new,) + tuple(raw[1:]) if isinstance(raw, tuple) else new
    if layout == "swap":
        return new.transpose(1, 2).contiguous()
    if layout in ("heads_q", "heads_kv"):
        return new.transpose(1, 2).reshape(raw.shape)
    if layout.startswith("fused"):
        i, d = int(layout[-1]), spec.head_dim
        b, s = raw.shape[:2]
        out = raw.clone().view(b, s, spec.n_heads, 3 * d)
        out[..., i * d : (i + 1) * d] = new.transpose(1, 2)
        return out.reshape(raw.shape)
    if layout.startswith("flat"):
        start, stop, _ = _flat_span(layout, spec)
        out = raw.clone()
        out[..., start:stop] = new.transpose(1, 2).flatten(-2)
        return out
    if layout in ("rope_q", "rope_k"):
        i = 0 if layout == "rope_q" else 1
        return tuple(new if j == i else x for j, x in enumerate(raw))
    if layout == "logits":
        out = type(raw)(**{k: v for k, v in raw.items()})
        out.logits = new
        return out
    raise _unknown(layout)


#: Layouts whose module value is a view of notekv's tensor (and the other way round).
VIEW_LAYOUTS = ("plain", "swap")


def module_view(layout: str, t: torch.Tensor) -> torch.Tensor:
    """The module-layout view of notekv-layout tensor ``t`` (storage shared: an in-place edit
    of the view edits ``t``); :func:`to_site` of the view gives ``t`` back. Only for
    :data:`VIEW_LAYOUTS`."""
    if layout == "plain":
        return t
    if layout == "swap":
        return t.transpose(1, 2)
    raise _unknown(layout) if layout not in LAYOUTS else _not_a_view(layout)


def _not_a_view(layout: str) -> ValueError:
    # A caller asked for a view of a layout that reshapes or slices: a bug in the caller.
    return ValueError(f"layout {layout!r} is not a view of notekv's tensor; views: {VIEW_LAYOUTS}")
