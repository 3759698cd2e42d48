"""One aligned pair, prefilled once: the OLD and NEW caches of everything before the
decision token, and batched decision steps on mixtures of the two.

This is the paper's causal KV patching done faithfully: the OLD prompt is prefilled (all but
the decision token); a set P of (layer, slot) cells of its cache is replaced with NEW's; the
decision token is then decoded against that cache, and ``s = logit[good] - logit[bad]``.
Many sets P run as rows of batched decode steps. Each row holds its own mixed cache, so the
rows of one step are bounded by a byte budget (``notekv.kv.cache.KV_BUDGET``, 1 GiB, or the
``budget`` argument): memory stays flat in the number of rows at any context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import notekv as nk
from notekv.kv import KVCache

from .scenarios import Pair

MAX_ROWS = 48  # rows of one decode step at most (the battery's batch at short contexts)


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


def rows_per_chunk(cache: KVCache, budget: int | None = None, most: int | None = MAX_ROWS) -> int:
    """Rows of one batched step over ``cache`` when each row materialises a copy of it:
    ``budget // cache.row_bytes`` (all layers, K and V, at the cache's dtype), at least 1 and
    at most ``most``. ``budget`` defaults to ``notekv.kv.cache.KV_BUDGET``."""
    rows = cache.rows_within(budget)
    return rows if most is None else min(most, rows)


def row_chunks(n_rows: int, cache: KVCache, budget: int | None = None, most: int | None = None) -> list[range]:
    """``range(n_rows)`` cut into consecutive chunks of :func:`rows_per_chunk` rows."""
    step = rows_per_chunk(cache, budget, most)
    return [range(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def mixed_cache(st: PairState, masks: torch.Tensor) -> KVCache:
    """A batch of caches: row b takes NEW's K/V where ``masks[b, layer, slot]``, else OLD's
    (built on the caches' device)."""
    m = masks.to(st.old.keys.device)[:, :, None, :, None].permute(1, 0, 2, 3, 4)  # [L, B, 1, S, 1]
    keys = torch.where(m, st.new.keys, st.old.keys)
    values = torch.where(m, st.new.values, st.old.values)
    return KVCache(keys, values, st.old.positions, st.old.token_ids, st.old.segments, st.old.fingerprint,
                   st.old.rope, st.old.max_positions)


def decide(model: nk.HookedModel, st: PairState, masks: torch.Tensor, interventions=(),
           budget: int | None = None) -> torch.Tensor:
    """``s`` of the decision step for each mask row ``[B, L, S]`` (True = NEW's K/V).

    Rows run in chunks of :func:`rows_per_chunk` (``budget`` bytes of mixed caches per step,
    default ``notekv.kv.cache.KV_BUDGET``; the step's append copies them once more)."""
    p = st.pair
    out = []
    chunk = rows_per_chunk(st.old, budget)
    for i in range(0, masks.shape[0], chunk):
        part = masks[i : i + chunk]
        ids = torch.full((part.shape[0], 1), p.old_ids[-1], dtype=torch.long)
        # the Run (and the cache it appended into) is dropped at once: one chunk's caches at a time
        logits = model.run(ids, past=mixed_cache(st, part), interventions=interventions, logits="last").logits
        out.append(logits[:, -1, p.good] - logits[:, -1, p.bad])
    return torch.cat(out)


def slot_mask(st: PairState, slots, layers=None) -> torch.Tensor:
    """One mask ``[L, S]``: ``slots`` at ``layers`` (all layers by default)."""
    m = torch.zeros(st.old.n_layers, st.n_ctx, dtype=torch.bool)
    slots = list(slots)
    if slots:
        rows = torch.arange(st.old.n_layers) if layers is None else torch.as_tensor(list(layers))
        m[rows[:, None], torch.tensor(slots)[None, :]] = True
    return m
