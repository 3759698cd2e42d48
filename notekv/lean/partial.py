"""Finishing a forward from a middle layer: the fast path of residual-stream patching sweeps.

Patching the residual stream entering layer ``l`` at position ``p`` leaves every layer
below ``l`` and every position before ``p`` exactly as in the unpatched run. So a sweep
cell needs only layers ``l..L-1`` over positions ``p..``, with the unpatched run's K/V for
the slots before ``p``. :func:`forward_from` computes that for a batch of residual streams
(one per cell) sharing those earlier slots.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..kv import KVCache
from ..model.arch import OutOfRangeError, get_submodule
from .forward import check_lean, decoder_layers, layer_refs, rope_tables, unembed_logits


@torch.no_grad()
def forward_from(model, resid: torch.Tensor, layer: int, positions: torch.Tensor,
                 past: KVCache | None = None, *,
                 past_slots: int | None = None, logits: str = "last") -> torch.Tensor:
    """Run layers ``layer..L-1`` of ``model`` (a HookedModel) on ``resid [B, seq, d_model]``,
    the residual stream entering ``layer`` (its ``resid_pre``) at the tokens at
    ``positions [seq]``, and return
    float32 logits of the last token ``[B, vocab]`` (or of every token, ``[B, seq, vocab]``,
    with ``logits="all"``).

    ``past``: the cache of the earlier tokens (batch 1, shared by every row), of which the
    first ``past_slots`` slots are used (default all); its layers ``>= layer`` are read.
    """
    check_lean(model)
    spec = model.spec
    if not 0 <= layer < spec.n_layers:
        raise OutOfRangeError(f"layer={layer}: layer {layer} out of range, {model.name} has {spec.n_layers} layers "
                              f"(0..{spec.n_layers - 1})")
    if resid.dim() != 3 or resid.shape[2] != spec.d_model:
        raise InputError(f"resid: resid must be [batch, seq, {spec.d_model}], got {tuple(resid.shape)}")
    positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
    b, s, _ = resid.shape
    if positions.numel() != s:
        raise InputError(f"positions: {positions.numel()} positions for {s} tokens; give one per token")
    if past is not None:
        past.check_model(model)
        if past.keys.shape[1] != 1:
            raise InputError(f"past: past must be a batch-1 cache (it is shared by every row), got batch "
                             f"{past.keys.shape[1]}")
        n_past = len(past) if past_slots is None else past_slots
        if not 0 <= n_past <= len(past):
            raise InputError(f"past_slots={n_past}: past_slots {n_past} outside the cache's 0..{len(past)} slots")
    else:
        n_past = 0
    dev = model.device
    dtype = next(model.hf.parameters()).dtype
    refs = layer_refs(model)
    lay = spec.layout
    final_norm, unembed = get_submodule(model.hf, lay.final_norm), get_submodule(model.hf, lay.unembed)
    qpos = positions.to(dev)
    kpos = qpos if not n_past else torch.cat([past.positions[:n_past].to(dev), qpos])
    tables = rope_tables(spec, positions, dtype, dev)
    group = spec.n_heads // spec.n_kv_heads

    def with_past(l: int, k: torch.Tensor, v: torch.Tensor):
        if not n_past:
            return k, v
        pk = past.keys[l, :, :, :n_past].to(dev, dtype).expand(b, -1, -1, -1)
        pv = past.values[l, :, :, :n_past].to(dev, dtype).expand(b, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    x = decoder_layers(refs, resid.to(dev, dtype), range(layer, spec.n_layers), tables, with_past, qpos, kpos, group,
                       n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim)
    return unembed_logits(final_norm, unembed, x, logits, spec.final_logit_softcap)
