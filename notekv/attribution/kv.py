"""KV attribution: the effect of every (layer, KV head, slot) cell of a cache patch on the
decision, from one decode step and one backward pass.

Exact KV patching gives the OLD prompt's cache NEW's K and/or V at a set of cells and
decodes the decision token against it: ``s = logit[good] - logit[bad]``. A cell of layer
``l`` is read only by layer ``l``'s attention of the decision query, so its whole effect
enters the decision token's residual stream through that layer's per-head output ``z``.
Three estimates of ``s_patched - s_old`` per cell, all from one OLD decode step:

* ``v``: ``grad_v . (v_new - v_old)``, with ``grad_v`` the gradient at the cached value.
  ``z`` is linear in the values, so this is exact at the layer; only what follows it is
  linearised.
* ``k`` (AtP): ``grad_k . (k_new - k_old)``, linearising the softmax too. Where the
  decision query's attention saturates this misses large effects.
* ``k_fixed`` and ``kv`` (AtP*, the key fix): the decision query's attention at that layer
  is recomputed exactly for the patched key (one score changes: the pattern renormalises in
  closed form), then ``grad_z . (z_patched - z_old)``; ``kv`` patches the value as well.

Everything is in logits of ``s``; divide by ``s_new - s_old`` for recovery. Rows of a batch
are independent pairs (equal cache lengths), so one backward pass serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError, InputTypeError
from ..hooks.grad import Tap
from ..hooks.interventions import Collect
from ..kv import KVCache
from ..model.arch import get_submodule
from ..model.attnmath import scaled_scores, scaling_of

PARTS = ("kv", "k", "v", "k_fixed", "kv_plain")


@dataclass
class KVAttribution:
    """Estimated ``s_patched - s_old`` (logits) of patching each cell, ``[B, L, H_kv, S]``.

    ``kv`` / ``k_fixed``: the key-fixed estimates (K and V; K only); ``k`` / ``v``: plain
    gradient estimates (``kv_plain = k + v``); ``s_old`` ``[B]``: the decision score on
    OLD's cache. Slots are the cached context (the decision token's own slot excluded).
    ``heads`` ``[B, L, H_q]``: the estimate of patching one query head's decision-step
    output (``attn.z``) from NEW's decode step into OLD's (the read heads).
    """

    kv: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_fixed: torch.Tensor
    s_old: torch.Tensor
    heads: torch.Tensor

    @property
    def kv_plain(self) -> torch.Tensor:
        return self.k + self.v

    def part(self, name: str = "kv") -> torch.Tensor:
        if name not in PARTS:
            raise InputError(f"part={name!r}: choose one of {PARTS}")
        return getattr(self, name)

    def cells(self, part: str = "kv") -> torch.Tensor:
        """``[B, L, S]``: patching every KV head of (layer, slot) at once (heads summed)."""
        return self.part(part).sum(2)

    def positions(self, part: str = "kv") -> torch.Tensor:
        """``[B, S]``: patching a slot at every layer (layers and heads summed)."""
        return self.part(part).sum((1, 2))

    def row(self, b: int) -> "KVAttribution":
        return KVAttribution(*(t[b : b + 1] for t in (self.kv, self.k, self.v, self.k_fixed, self.s_old, self.heads)))


def stack_rows(caches: Sequence[KVCache]) -> KVCache:
    """Batch-1 caches of equal length as the rows of one cache (their own slot metadata is
    taken from the first; RoPE positions must agree)."""
    caches = list(caches) if not isinstance(caches, KVCache) else [caches]
    if not caches or not all(isinstance(c, KVCache) for c in caches):
        raise InputError(f"caches: pass a non-empty list of KVCaches (got {len(caches)} item(s) of types "
                         f"{sorted({type(c).__name__ for c in caches})})")
    first = caches[0]
    for c in caches[1:]:
        first._check_peer(c)
        if len(c) != len(first) or not torch.equal(c.positions, first.positions):
            raise InputError(f"caches of {len(first)} and {len(c)} slots (or other positions) cannot share a batch; "
                             "group pairs by length")
    if len(caches) == 1:
        return first
    return KVCache(torch.cat([c.keys for c in caches], 1), torch.cat([c.values for c in caches], 1), first.positions,
                   first.token_ids, first.segments, first.fingerprint, first.rope, first.max_positions)


def _per_row(model, x, batch: int, what: str, device) -> torch.Tensor:
    from ..sweep import int_list

    ids = int_list(what, [x] if not isinstance(x, (list, tuple, torch.Tensor)) else x, low=0,
                   high=model.spec.vocab_size - 1)
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise InputError(f"{what}: {t.numel()} token ids for {batch} batch rows; give one per row (or one for all)")
    return t.to(device)


@torch.enable_grad()  # the score is computed here from a forward with gradients
def attribute_kv(model, old: KVCache, new: KVCache, token, good, bad) -> KVAttribution:
    """KV attribution of NEW's cache cells into OLD's, for the decision step ``token``.

    ``old`` / ``new``: caches of the context before the decision token, ``[L, B, H, S, D]``
    each (B pairs of one length, aligned slot for slot); ``token``, ``good``, ``bad``: token
    ids, one per row or one for all. One decode step with gradients, one backward pass.
    """
    if not isinstance(old, KVCache) or not isinstance(new, KVCache):
        raise InputTypeError(f"attribute_kv: old and new must be KVCaches, got {type(old).__name__} and "
                             f"{type(new).__name__}; build them with KVCache.prefill or KVCache.from_run")
    old.check_model(model)
    new.check_model(model)
    if old.keys.shape != new.keys.shape:
        raise InputError(f"old and new caches differ in shape ({tuple(old.keys.shape)} vs {tuple(new.keys.shape)}): "
                         "attribution compares aligned caches of the same prompt length and batch")
    spec, L = model.spec, old.n_layers
    B, S = old.keys.shape[1], len(old)
    dev = model.device
    token = _per_row(model, token, B, "token", dev)
    good, bad = _per_row(model, good, B, "good", dev), _per_row(model, bad, B, "bad", dev)
    same = torch.nonzero(good == bad).flatten().tolist()
    if same:
        raise InputError(f"good and bad are the same token id {int(good[same[0]])} in row {same[0]}, so "
                         "logit[good] - logit[bad] is 0 whatever is patched; give two different answer tokens per row")
    ivs = []
    for l in range(L):
        ivs += [Tap(f"L{l}.attn.z"), Tap(f"L{l}.kv.k"), Tap(f"L{l}.kv.v"), Collect(f"L{l}.attn.scores"),
                Collect(f"L{l}.attn.q")]
    z_new = model.run(token[:, None], past=new, collect=[f"L{l}.attn.z" for l in range(L)], logits="last")
    run = model.run(token[:, None], past=old, interventions=ivs, logits="last", grad=True)
    rows = torch.arange(B, device=run.logits.device)
    s = run.logits[rows, -1, good] - run.logits[rows, -1, bad]
    grads = run.grads(s.sum())
    layout, softcap = spec.layout, spec.attn_logit_softcap
    groups = spec.group_size
    out = {p: [] for p in ("kv", "k", "v", "k_fixed", "heads")}
    work = torch.promote_types(old.keys.dtype, torch.float32)  # bf16 models: fp32 arithmetic
    for l in range(L):
        k_old, k_new = old.keys[l].to(work), new.keys[l].to(work)  # [B, Hkv, S, D]
        v_old, v_new = old.values[l].to(work), new.values[l].to(work)
        dev_l = k_old.device
        gk = grads[f"L{l}.kv.k"][:, :, :S].to(work).to(dev_l)
        gv = grads[f"L{l}.kv.v"][:, :, :S].to(work).to(dev_l)
        out["k"].append((gk * (k_new - k_old)).sum(-1))
        out["v"].append((gv * (v_new - v_old)).sum(-1))
        attn = get_submodule(model.hf, f"{layout.layers}.{l}.{layout.attn}")
        scaling = scaling_of(attn, spec)
        q = run[f"L{l}.attn.q"][:, :, -1].to(work).to(dev_l)  # [B, Hq, D]
        scores = run[f"L{l}.attn.scores"][:, :, -1, : S + 1].to(work).to(dev_l)  # [B, Hq, S+1], masked
        if layout.attn_sinks:  # GPT-OSS: the sink is one more key, without a value
            sink = attn.sinks.detach().to(work).to(dev_l)
            scores = torch.cat([scores, sink[None, :, None].expand(scores.shape[0], -1, 1)], -1)
        gz = grads[f"L{l}.attn.z"][:, :, -1].to(work).to(dev_l)  # [B, Hq, D]
        v_self = run[f"L{l}.kv.v"][:, :, S].to(work).to(dev_l)  # [B, Hkv, D]: the decision token's value
        fixed_k, fixed_kv = _key_fixed(q, scores, gz, k_old, k_new, v_old, v_new, v_self, scaling, softcap, groups)
        out["k_fixed"].append(fixed_k)
        out["kv"].append(fixed_kv)
        dz = z_new[f"L{l}.attn.z"][:, :, -1].to(work).to(dev_l) - run[f"L{l}.attn.z"][:, :, -1].to(work).to(dev_l)
        out["heads"].append((gz * dz).sum(-1))
    st = {p: torch.stack(v, 1) for p, v in out.items()}  # [B, L, Hkv, S]; heads [B, L, Hq]
    return KVAttribution(st["kv"], st["k"], st["v"], st["k_fixed"], s.detach().to(work), st["heads"])


def _key_fixed(q, scores, gz, k_old, k_new, v_old, v_new, v_self, scaling, softcap, groups):
    """Per query head, patch one key (and value) at a time and recompute the decision query's
    attention exactly: only that key's score changes, by ``d``; the other keys keep their
    weights ``w_j = exp(s_j - max)``, whose sums without the patched key come from prefix and
    suffix sums (no cancellation when one key takes nearly all the attention). Then
    ``gz . z`` of the patched attention minus the unpatched one, with ``u_j = gz . v_j``:
    ``(w'_p u'_p + U_p) / (w'_p + W_p) - (w_p u_p + U_p) / (w_p + W_p)``, summed over each
    KV head's query heads. Returns the K-only and K+V estimates ``[B, H_kv, S]``."""
    S = k_old.shape[2]
    rep = lambda x: x.repeat_interleave(groups, dim=1)  # [B, Hkv, ...] -> [B, Hq, ...] (repeat_kv order)
    raw_old = scaled_scores(torch.einsum("bhd,bhsd->bhs", q, rep(k_old)), scaling, softcap)
    raw_new = scaled_scores(torch.einsum("bhd,bhsd->bhs", q, rep(k_new)), scaling, softcap)
    top = scores.max(-1, keepdim=True).values
    w = torch.exp(scores - top)  # [B, Hq, S+1], 0 where masked
    u_old = torch.einsum("bhd,bhsd->bhs", gz, rep(v_old))  # [B, Hq, S]
    u_new = torch.einsum("bhd,bhsd->bhs", gz, rep(v_new))
    u_self = torch.einsum("bhd,bhd->bh", gz, rep(v_self[:, :, None])[:, :, 0])  # the decision token's own key
    u = torch.cat([u_old, u_self[..., None]], -1)
    u = torch.nn.functional.pad(u, (0, scores.shape[-1] - u.shape[-1]))  # an attention sink adds nothing to z
    W = _exclusive_sum(w)[..., :S]
    U = _exclusive_sum(w * u)[..., :S]
    s_p = scores[..., :S]
    moved = s_p + (raw_new - raw_old)
    ceiling = torch.maximum(top, moved)
    shrink = torch.exp(top - ceiling)
    w_new = torch.exp(moved - ceiling)
    w_old = w[..., :S]
    base = (w_old * u_old + U) / (w_old + W)
    k_only = (w_new * u_old + shrink * U) / (w_new + shrink * W) - base
    both = (w_new * u_new + shrink * U) / (w_new + shrink * W) - base
    B, Hq = q.shape[:2]
    fold = lambda x: torch.nan_to_num(x, nan=0.0).view(B, Hq // groups, groups, S).sum(2)
    return fold(k_only), fold(both)


def _exclusive_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., p] = sum of x[..., j] for j != p``, as a prefix plus a suffix sum."""
    zero = torch.zeros_like(x[..., :1])
    prefix = torch.cat([zero, torch.cumsum(x, -1)[..., :-1]], -1)
    suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1])[..., 1:], zero], -1)
    return prefix + suffix
