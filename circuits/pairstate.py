"""One aligned pair, prefilled once: the OLD and NEW caches of everything before the
decision token, and batched decision steps on mixtures of the two.

This is the paper's causal KV patching done faithfully: the OLD prompt is prefilled (all but
the decision token); a set P of (layer, slot) cells of its cache is replaced with NEW's; the
decision token is then decoded against that cache, and ``s = logit[good] - logit[bad]``.
Many sets P run as rows of one batched decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import notekv as nk
from notekv.kv import KVCache

from .scenarios import Pair


@dataclass
class PairState:
    pair: Pair
    old: KVCache  # [L, 1, H, S-1, D]: the OLD prompt without its decision token
    new: KVCache
    s_old: float
    s_new: float

    @property
    def swing(self) -> float:
        return self.s_new - self.s_old

    @property
    def flips(self) -> bool:
        p = self.pair
        return self.s_old * p.expect_old > 0 and self.s_new * p.expect_new > 0

    def recovery(self, s: torch.Tensor | float) -> torch.Tensor | float:
        return (s - self.s_old) / (self.s_new - self.s_old)

    @property
    def n_ctx(self) -> int:
        return len(self.old)

    @property
    def region_slots(self) -> dict[str, list[int]]:
        """Slots of the cached context by region (sink, policy, examples, field, downstream)."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.pair.regions[: self.n_ctx]):
            out.setdefault(r, []).append(i)
        return out


def prefill_pair(model: nk.HookedModel, pair: Pair) -> PairState:
    """Prefill OLD and NEW (all but the decision token) and score both decisions. The prefix
    before the edited span is identical in both, so it is computed once."""
    start = min(pair.span_slots)
    prefix = model.run(list(pair.old_ids[:start]), logits="last") if start else None
    caches = []
    for ids in (pair.old_ids, pair.new_ids):
        run = model.run(torch.tensor([ids[start:-1]]), past=prefix, logits="last")
        caches.append(KVCache.from_hf(run.hf_cache, model, ids[:-1]))
    st = PairState(pair, caches[0], caches[1], 0.0, 0.0)
    both = torch.zeros(2, st.old.n_layers, len(st.old), dtype=torch.bool)
    both[1] = True
    s = decide(model, st, both)
    st.s_old, st.s_new = float(s[0]), float(s[1])
    return st


def mixed_cache(st: PairState, masks: torch.Tensor) -> KVCache:
    """A batch of caches: row b takes NEW's K/V where ``masks[b, layer, slot]``, else OLD's."""
    m = masks[:, :, None, :, None].permute(1, 0, 2, 3, 4).to(st.old.keys.device)  # [L, B, 1, S, 1]
    keys = torch.where(m, st.new.keys, st.old.keys)
    values = torch.where(m, st.new.values, st.old.values)
    return KVCache(keys, values, st.old.positions, st.old.token_ids, st.old.segments, st.old.fingerprint,
                   st.old.rope, st.old.max_positions)


def decide(model: nk.HookedModel, st: PairState, masks: torch.Tensor, interventions=(), chunk: int = 48) -> torch.Tensor:
    """``s`` of the decision step for each mask row ``[B, L, S]`` (True = NEW's K/V)."""
    p = st.pair
    out = []
    for i in range(0, masks.shape[0], chunk):
        part = masks[i : i + chunk]
        ids = torch.full((part.shape[0], 1), p.old_ids[-1], dtype=torch.long)
        run = model.run(ids, past=mixed_cache(st, part), interventions=interventions, logits="last")
        out.append(run.logits[:, -1, p.good] - run.logits[:, -1, p.bad])
    return torch.cat(out)


def slot_mask(st: PairState, slots, layers=None) -> torch.Tensor:
    """One mask ``[L, S]``: ``slots`` at ``layers`` (all layers by default)."""
    m = torch.zeros(st.old.n_layers, st.n_ctx, dtype=torch.bool)
    slots = list(slots)
    if slots:
        rows = torch.arange(st.old.n_layers) if layers is None else torch.as_tensor(list(layers))
        m[rows[:, None], torch.tensor(slots)[None, :]] = True
    return m
