"""One aligned pair, prefilled once: the OLD and NEW caches of everything before the
decision token, and batched decision steps on mixtures of the two.

This is the paper's causal KV patching done faithfully: the OLD prompt is prefilled (all but
the decision token); a set P of (layer, slot) cells of its cache is replaced with NEW's; the
decision token is then decoded against that cache, and ``s = logit[good] - logit[bad]``.
Many sets P run as rows of batched decode steps of notekv's one batched runner
(:func:`notekv.runner.run_variants`), which bounds each step's rows by a byte budget
(``notekv.kv.cache.KV_BUDGET``, 1 GiB, or the ``budget`` argument): memory stays flat in the
number of rows at any context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import notekv as nk
from notekv.kv import KVCache
from notekv.runner import KVMix, logit_diff, rows_per_step, run_variants

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
    def field_onward(self) -> list[int]:
        """The edited span and every cached slot after it (the field plus its downstream)."""
        return list(range(min(self.pair.span_slots), self.n_ctx))

    @property
    def downstream(self) -> list[int]:
        """The cached slots after the edited span (the pair's ``downstream`` region, without
        the decision token)."""
        return list(range(max(self.pair.span_slots) + 1, self.n_ctx))

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
    return rows_per_step(cache, budget, most)


def decide(model: nk.HookedModel, st: PairState, masks: torch.Tensor, interventions=(),
           budget: int | None = None, method: str = "auto") -> torch.Tensor:
    """``s`` (float64) of the decision step for each mask row ``[B, L, S]`` (True = NEW's K/V),
    through the one batched runner (:func:`notekv.runner.run_variants`): rows in chunks of at
    most :data:`MAX_ROWS` within ``budget`` bytes of per-row cache copies (default
    ``notekv.kv.cache.KV_BUDGET``); ``interventions`` apply to every row."""
    p = st.pair
    return run_variants(model, [p.old_ids[-1]], KVMix.of_slots(st.new, masks), logit_diff(p.good, p.bad),
                        past=st.old, shared=tuple(interventions), budget=budget, most=MAX_ROWS, method=method)


def slot_mask(st: PairState, slots, layers=None) -> torch.Tensor:
    """One mask ``[L, S]``: ``slots`` at ``layers`` (all layers by default)."""
    m = torch.zeros(st.old.n_layers, st.n_ctx, dtype=torch.bool)
    slots = list(slots)
    if slots:
        rows = torch.arange(st.old.n_layers) if layers is None else torch.as_tensor(list(layers))
        m[rows[:, None], torch.tensor(slots)[None, :]] = True
    return m
