"""The lean forward: a decoder pass over a static, stacked KV buffer.

It reads the HF module's own weights (no copies) through the family table, so what it
computes is the model's computation; what it leaves out is the generic machinery:

- K/V are written with one ``index_copy_`` per layer into ``[L, 1, H_kv, capacity, D]``
  buffers (no cache objects, no ``torch.cat`` growth);
- grouped-query attention never expands K/V: the ``g`` query heads sharing a KV head are
  folded into the query-row axis (``[1, H_kv, g * s, D]``), so one SDPA call per layer
  reads each KV head once;
- RoPE cos/sin come from tables precomputed for every slot, indexed by position;
- only the last token goes through the final norm and the unembedding.

Every shape depends only on ``(s, kv_len)``, and the positions arrive as a tensor, so the
same call can be captured in a CUDA graph (:mod:`notekv.lean.graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.arch import ArchSpec, UnsupportedArchitectureError, get_submodule


class LeanUnsupportedError(UnsupportedArchitectureError):
    """The model has a feature the lean path does not implement (use the HF path)."""


@dataclass(frozen=True)
class LayerRefs:
    """The modules of one decoder layer the lean forward calls (``forward`` directly, so
    hook-layer hooks never fire inside it)."""

    ln_attn: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    attn_post: nn.Module | None  # sandwich norm on the attention output (Gemma-3)
    ln_mlp: nn.Module
    mlp: nn.Module
    mlp_post: nn.Module | None
    scaling: float
    window: int | None
    table: int  # index of this layer's RoPE table


def lean_support(model) -> str | None:
    """Why the lean path cannot run ``model`` (a HookedModel), or None when it can."""
    spec: ArchSpec = model.spec
    lay = spec.layout
    cfg = model.hf.config
    if lay.q_proj is None or lay.k_proj is None or lay.v_proj is None:
        return f"{spec.model_type} uses a fused QKV projection; the lean path reads separate q/k/v projections"
    if lay.parallel_residual or (lay.parallel_residual_flag and getattr(cfg, lay.parallel_residual_flag, False)):
        return f"{spec.model_type} uses a parallel residual; the lean path runs sequential blocks"
    if lay.resid_mid is None:
        return f"{spec.model_type} has no residual stream between attention and MLP"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not implemented in the lean path"
    for r in spec.rope:
        if r.unsupported:
            return r.unsupported
        if r.pairing != "half":
            return f"RoPE pairing {r.pairing!r}: the lean path applies half-split rotation"
    return None


def check_lean(model) -> None:
    reason = lean_support(model)
    if reason:
        raise LeanUnsupportedError(f"{reason}; use engine='hf' for {model.name}")


def layer_refs(model) -> list[LayerRefs]:
    spec: ArchSpec = model.spec
    lay = spec.layout
    layers = get_submodule(model.hf, lay.layers)
    facts = [(r.inv_freq, r.attention_factor) for r in spec.rope]
    tables = sorted(set(facts), key=facts.index)
    out = []
    for i, layer in enumerate(layers):
        attn = get_submodule(layer, lay.attn)

        def sub(root, path):
            return None if path is None else get_submodule(root, path)

        out.append(LayerRefs(
            ln_attn=sub(layer, lay.ln_attn), q_proj=sub(attn, lay.q_proj), k_proj=sub(attn, lay.k_proj),
            v_proj=sub(attn, lay.v_proj), o_proj=sub(attn, lay.o_proj), q_norm=sub(attn, lay.q_norm),
            k_norm=sub(attn, lay.k_norm),
            attn_post=None if lay.attn_out == lay.attn else sub(layer, lay.attn_out),
            ln_mlp=sub(layer, lay.ln_mlp), mlp=sub(layer, lay.mlp),
            mlp_post=None if lay.mlp_out == lay.mlp else sub(layer, lay.mlp_out),
            scaling=float(getattr(attn, "scaling", spec.head_dim ** -0.5)), window=spec.window_of(i),
            table=tables.index(facts[i]),
        ))
    return out


def rope_tables(spec: ArchSpec, capacity: int, dtype: torch.dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(cos, sin)]`` per distinct layer RoPE, each ``[capacity, rotary_dim]`` in ``dtype``:
    the angles in float32 exactly as the HF rotary modules compute them, then scaled by the
    attention factor and cast."""
    facts = [(r.inv_freq, r.attention_factor) for r in spec.rope]
    out = []
    for inv, factor in sorted(set(facts), key=facts.index):
        inv_t = torch.tensor(inv, dtype=torch.float32, device=device)
        freqs = torch.arange(capacity, device=device, dtype=torch.float32)[:, None] * inv_t[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        out.append(((emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)))
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on the first ``cos.shape[-1]`` dims of ``x [.., s, D]``; cos/sin ``[s, R]``."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    turned = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + turned * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def attention_mask(qpos: torch.Tensor, kv_len: int, window: int | None, group: int, dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, group * s, kv_len]``: slot ``j`` is visible to a query at
    position ``p`` iff ``j <= p`` (and ``p - j < window`` on sliding layers). Rows repeat
    the ``s`` query positions once per query head of the group."""
    j = torch.arange(kv_len, device=qpos.device)
    p = qpos.repeat(group)[:, None]
    ok = j[None, :] <= p
    if window is not None:
        ok = ok & (j[None, :] > p - window)
    mask = torch.zeros(ok.shape, dtype=dtype, device=qpos.device)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[None, None]


def lean_forward(refs: list[LayerRefs], embed: nn.Module, final_norm: nn.Module, unembed: nn.Module,
                 tables, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, qpos: torch.Tensor,
                 kv_len: int, *, n_heads: int, n_kv_heads: int, head_dim: int,
                 softcap: float | None = None, logits: str | None = "last") -> torch.Tensor | None:
    """Run ``ids [1, s]`` at positions ``qpos [s]`` (int64, on the model's device).

    Writes each layer's K/V into ``keys``/``values`` ``[L, 1, H_kv, capacity, D]`` at slots
    ``qpos`` and attends over slots ``[0, kv_len)``. Returns float32 logits of the last token
    ``[1, vocab]`` (``logits="last"``), of every token ``[1, s, vocab]`` (``"all"``) or None.
    """
    s = ids.shape[1]
    group = n_heads // n_kv_heads
    x = embed.forward(ids)
    masks: dict[int | None, torch.Tensor] = {}
    rows = [(cos.index_select(0, qpos), sin.index_select(0, qpos)) for cos, sin in tables]
    for l, r in enumerate(refs):
        h = r.ln_attn.forward(x)
        q = F.linear(h, r.q_proj.weight, r.q_proj.bias).view(1, s, n_heads, head_dim)
        k = F.linear(h, r.k_proj.weight, r.k_proj.bias).view(1, s, n_kv_heads, head_dim)
        v = F.linear(h, r.v_proj.weight, r.v_proj.bias).view(1, s, n_kv_heads, head_dim)
        if r.q_norm is not None:
            q, k = r.q_norm.forward(q), r.k_norm.forward(k)
        cos, sin = rows[r.table]
        # [1, s, H, D] -> [1, H, s, D]
        q = _rope(q.transpose(1, 2), cos, sin)
        k = _rope(k.transpose(1, 2), cos, sin)
        keys[l].index_copy_(2, qpos, k)
        values[l].index_copy_(2, qpos, v.transpose(1, 2))
        # Fold the group into rows: query head kv*g + i reads KV head kv (HF repeat_kv order).
        qg = q.reshape(1, n_kv_heads, group * s, head_dim)
        if r.window not in masks:
            masks[r.window] = attention_mask(qpos, kv_len, r.window, group, q.dtype)
        o = F.scaled_dot_product_attention(qg, keys[l, :, :, :kv_len], values[l, :, :, :kv_len],
                                           attn_mask=masks[r.window], scale=r.scaling)
        o = o.reshape(1, n_heads, s, head_dim).transpose(1, 2).reshape(1, s, n_heads * head_dim)
        a = F.linear(o, r.o_proj.weight, r.o_proj.bias)
        if r.attn_post is not None:
            a = r.attn_post.forward(a)
        x = x + a
        m = r.mlp.forward(r.ln_mlp.forward(x))
        if r.mlp_post is not None:
            m = r.mlp_post.forward(m)
        x = x + m
    if logits is None:
        return None
    h = x[:, -1] if logits == "last" else x
    out = F.linear(final_norm.forward(h), unembed.weight, getattr(unembed, "bias", None)).float()
    if softcap:
        out = torch.tanh(out / softcap) * softcap
    return out
