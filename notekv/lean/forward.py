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

from ..kv.rope import turn
from ..model.arch import LEAN_FAMILIES, ArchSpec, UnsupportedArchitectureError, get_submodule
from ..model.attnmath import additive_mask, scaling_of, softcap as cap_logits, visible


class LeanUnsupportedError(UnsupportedArchitectureError):
    """The model has a feature the lean path does not implement (use the HF path)."""


@dataclass(frozen=True)
class LayerRefs:
    """The modules of one decoder layer the lean forward calls (``forward`` directly, so
    hook-layer hooks never fire inside it)."""

    ln_attn: nn.Module
    q_proj: nn.Linear | None
    k_proj: nn.Linear | None
    v_proj: nn.Linear | None
    qkv_proj: nn.Linear | None  # fused, per-head [q | k | v] (GPT-NeoX)
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
    parallel: bool  # attention and MLP both read the layer's input (GPT-NeoX, GPT-J)


def lean_support(model) -> str | None:
    """Why the lean path cannot run ``model`` (a HookedModel), or None when it can."""
    spec: ArchSpec = model.spec
    lay = spec.layout
    if spec.model_type not in LEAN_FAMILIES:
        return (f"the lean forward does not implement the {spec.model_type} family (lean families: "
                f"{', '.join(sorted(LEAN_FAMILIES))})")
    if lay.qkv_proj is None and None in (lay.q_proj, lay.k_proj, lay.v_proj):
        return f"the {spec.model_type} family table names no q/k/v projections"
    if any(p.is_meta for p in model.hf.parameters()):
        return "weights offloaded by accelerate (meta parameters) cannot be read by the lean path"
    if spec.attn_logit_softcap:
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
            v_proj=sub(attn, lay.v_proj), qkv_proj=sub(attn, lay.qkv_proj), o_proj=sub(attn, lay.o_proj),
            q_norm=sub(attn, lay.q_norm),
            k_norm=sub(attn, lay.k_norm),
            attn_post=None if lay.attn_out == lay.attn else sub(layer, lay.attn_out),
            ln_mlp=sub(layer, lay.ln_mlp), mlp=sub(layer, lay.mlp),
            mlp_post=None if lay.mlp_out == lay.mlp else sub(layer, lay.mlp_out),
            scaling=scaling_of(attn, spec), window=spec.window_of(i),
            table=tables.index(facts[i]), parallel=lay.parallel_residual,
        ))
    return out


def rope_tables(spec: ArchSpec, positions: torch.Tensor, dtype: torch.dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(cos, sin)]`` per distinct layer RoPE (index :attr:`LayerRefs.table`), each
    ``[len(positions), rotary_dim]`` in ``dtype``: the angles in float32 exactly as the HF
    rotary modules compute them, then scaled by the attention factor and cast."""
    facts = [(r.inv_freq, r.attention_factor) for r in spec.rope]
    pos = positions.to(device=device, dtype=torch.float32)
    out = []
    for inv, factor in sorted(set(facts), key=facts.index):
        inv_t = torch.tensor(inv, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_t[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        out.append(((emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)))
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on the first ``cos.shape[-1]`` dims of ``x [.., s, D]``; cos/sin ``[s, R]``
    (both halves equal, as the HF rotary modules build them)."""
    r = cos.shape[-1]
    return turn(x, cos[..., : r // 2], sin[..., : r // 2], r, "half")


def attention_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, group: int, dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, group * s, n_keys]``: the key at position ``kpos[j]`` is
    visible to a query at position ``p`` iff ``kpos[j] <= p`` (and ``p - kpos[j] < window`` on
    sliding layers). Rows repeat the ``s`` query positions once per query head of the group."""
    return additive_mask(visible(qpos.repeat(group), kpos, window), dtype)[None, None]


def qkv(r: LayerRefs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
        head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE ``q [B, H, s, D]``, ``k``, ``v [B, H_kv, s, D]`` of the residual ``x [B, s, d]``."""
    b, s = x.shape[:2]
    h = r.ln_attn.forward(x)
    if r.qkv_proj is not None:
        fused = F.linear(h, r.qkv_proj.weight, r.qkv_proj.bias).view(b, s, n_heads, 3 * head_dim)
        q, k, v = fused.split(head_dim, dim=-1)
    else:
        q = F.linear(h, r.q_proj.weight, r.q_proj.bias).view(b, s, n_heads, head_dim)
        k = F.linear(h, r.k_proj.weight, r.k_proj.bias).view(b, s, n_kv_heads, head_dim)
        v = F.linear(h, r.v_proj.weight, r.v_proj.bias).view(b, s, n_kv_heads, head_dim)
    if r.q_norm is not None:
        q, k = r.q_norm.forward(q), r.k_norm.forward(k)
    return _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def attend(r: LayerRefs, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped attention without expanding K/V: ``q [B, H, s, D]`` over ``keys``/``values``
    ``[B, H_kv, S, D]``; returns ``[B, s, H * D]``."""
    b, n_heads, s, d = q.shape
    n_kv = keys.shape[1]
    # Fold the group into rows: query head kv*g + i reads KV head kv (HF repeat_kv order).
    qg = q.reshape(b, n_kv, (n_heads // n_kv) * s, d)
    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=r.scaling)
    return o.reshape(b, n_heads, s, d).transpose(1, 2).reshape(b, s, n_heads * d)


def block_rest(r: LayerRefs, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The residual stream after the layer: ``x`` plus the attention output ``o`` (through
    ``o_proj`` and any post-norm) plus the MLP's output, the MLP reading ``x + attention``
    (sequential) or ``x`` itself (parallel residual)."""
    a = F.linear(o, r.o_proj.weight, r.o_proj.bias)
    if r.attn_post is not None:
        a = r.attn_post.forward(a)
    mid = x + a
    m = r.mlp.forward(r.ln_mlp.forward(x if r.parallel else mid))
    if r.mlp_post is not None:
        m = r.mlp_post.forward(m)
    return mid + m


def unembed_logits(final_norm: nn.Module, unembed: nn.Module, x: torch.Tensor, which: str,
                   softcap: float | None) -> torch.Tensor:
    h = x[:, -1] if which == "last" else x
    out = F.linear(final_norm.forward(h), unembed.weight, getattr(unembed, "bias", None)).float()
    return cap_logits(out, softcap)


def lean_forward(refs: list[LayerRefs], embed: nn.Module, final_norm: nn.Module, unembed: nn.Module,
                 tables, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, qpos: torch.Tensor,
                 kv_len: int, *, n_heads: int, n_kv_heads: int, head_dim: int,
                 softcap: float | None = None, logits: str | None = "last") -> torch.Tensor | None:
    """Run ``ids [1, s]`` at positions ``qpos [s]`` (int64, on the model's device).

    Writes each layer's K/V into ``keys``/``values`` ``[L, 1, H_kv, capacity, D]`` at slots
    ``qpos`` and attends over slots ``[0, kv_len)``. Returns float32 logits of the last token
    ``[1, vocab]`` (``logits="last"``), of every token ``[1, s, vocab]`` (``"all"``) or None.
    """
    group = n_heads // n_kv_heads
    x = embed.forward(ids)
    kpos = torch.arange(kv_len, device=qpos.device)
    rows = [(cos.index_select(0, qpos), sin.index_select(0, qpos)) for cos, sin in tables]

    def into_buffer(l: int, k: torch.Tensor, v: torch.Tensor):
        keys[l].index_copy_(2, qpos, k)
        values[l].index_copy_(2, qpos, v)
        return keys[l, :, :, :kv_len], values[l, :, :, :kv_len]

    x = decoder_layers(refs, x, range(len(refs)), rows, into_buffer, qpos, kpos, group,
                       n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    return None if logits is None else unembed_logits(final_norm, unembed, x, logits, softcap)


def decoder_layers(refs: list[LayerRefs], x: torch.Tensor, layers: range, rows, kv_of, qpos: torch.Tensor,
                   kpos: torch.Tensor, group: int, *, n_heads: int, n_kv_heads: int, head_dim: int,
                   attention=None) -> torch.Tensor:
    """The one lean layer loop: run ``layers`` on the residual ``x [B, s, d]`` at query
    positions ``qpos``; ``rows[t]`` are the (cos, sin) rows of RoPE table ``t`` for them.

    ``kv_of(layer, k, v)`` receives the new tokens' K/V and returns the keys/values to attend
    over (at positions ``kpos``): the lean engine writes them into its buffer, the patching
    grid prepends the shared past. Masks are built once per window size. ``attention(layer,
    refs, q, k, v) -> [B, s, H * D]``, when given, replaces ``kv_of`` and the attention itself
    (the batched runner's rows that share most of their past).
    """
    masks: dict[int | None, torch.Tensor] = {}
    for l in layers:
        r = refs[l]
        q, k, v = qkv(r, x, *rows[r.table], n_heads, n_kv_heads, head_dim)
        if attention is not None:
            x = block_rest(r, x, attention(l, r, q, k, v))
            continue
        keys, values = kv_of(l, k, v)
        if r.window not in masks:
            masks[r.window] = attention_mask(qpos, kpos, r.window, group, q.dtype)
        x = block_rest(r, x, attend(r, q, keys, values, masks[r.window]))
    return x
