"""Attribution on prefilled pairs, for the report: the KV attribution map of every pair
(batched by context length), its exact check on the top and on random cells, and the
rankings it gives on long prompts (note positions, read heads).

Units are recovery: an estimate of ``s_patched - s_old`` divided by the pair's swing.
"""

from __future__ import annotations

import random
import warnings

import torch

import notekv as nk
from notekv.attribution import agreement, attribute_kv, exact_kv, stack_rows, summarize

from . import roles
from .pairstate import PairState

ABOVE = 300  # downstream positions above which the report ranks by attribution ("auto")
VERIFY = 32  # cells of largest estimate, and as many random cells, patched exactly per pair
SCATTER_PAIRS = 3  # pairs whose verified cells are drawn in the scatter figure
RANKINGS = ("auto", "exact", "attribution")


def downstream(st: PairState) -> list[int]:
    """Deprecated: :attr:`PairState.field_onward` (the field and the slots after it)."""
    warnings.warn("circuits.attribution.downstream is PairState.field_onward ('downstream' means after the field)",
                  DeprecationWarning, stacklevel=2)
    return st.field_onward


def choose(ranking: str, states: list[PairState]) -> str:
    """``"exact"`` or ``"attribution"``: the method that ranks note positions and heads."""
    if ranking not in RANKINGS:
        raise nk.InputError(f"ranking={ranking!r}: choose one of {RANKINGS}")
    if ranking != "auto":
        return ranking
    return "attribution" if max(len(s.field_onward) for s in states) > ABOVE else "exact"


def attribute_states(model, states: list[PairState]) -> dict[int, dict]:
    """``{id(state): record}``, each record holding the pair's estimates in recovery units:
    ``cells`` ``[L, S]`` (K and V of every head of a (layer, slot), key-fixed), ``plain``
    (the same without the key fix), ``per_position`` ``{slot: recovery}`` over the
    downstream slots (all layers patched) and ``heads`` ``[L, H]``."""
    groups: dict[int, list[PairState]] = {}
    for s in states:
        groups.setdefault(s.n_ctx, []).append(s)
    out = {}
    for group in groups.values():
        per = max(1, group[0].old.rows_within() // 4)  # the backward pass holds a few copies of each row
        for i in range(0, len(group), per):
            part = group[i : i + per]
            att = attribute_kv(model, stack_rows([s.old for s in part]), stack_rows([s.new for s in part]),
                               [s.pair.old_ids[-1] for s in part], [s.pair.good for s in part],
                               [s.pair.bad for s in part])
            for b, s in enumerate(part):
                swing = s.swing
                cells = (att.cells("kv")[b] / swing).cpu()
                pos = cells.sum(0)
                out[id(s)] = {"cells": cells, "plain": (att.cells("kv_plain")[b] / swing).cpu(),
                              "per_position": {q: float(pos[q]) for q in s.field_onward},
                              "heads": (att.heads[b] / swing).cpu()}
    return out


def verify(model, st: PairState, rec: dict, n: int = VERIFY, seed: int = 0) -> dict:
    """Exact recovery of the ``n`` (layer, slot) cells of largest estimate and ``n`` random
    downstream cells; their agreement with the key-fixed and the plain estimates."""
    L = rec["cells"].shape[0]
    live = [(l, q) for l in range(L) for q in st.field_onward]
    est = rec["cells"]
    top = sorted(live, key=lambda c: -abs(float(est[c])))[:n]
    chosen = set(top)
    rng = random.Random(seed * 7919 + st.pair.variant)
    cells = top + rng.sample([c for c in live if c not in chosen], min(n, len(live) - len(top)))
    p = st.pair
    exact = (exact_kv(model, st.old, st.new, p.old_ids[-1], p.good, p.bad, cells) / st.swing).float()
    fixed = torch.tensor([float(est[c]) for c in cells])
    plain = torch.tensor([float(rec["plain"][c]) for c in cells])
    return {"cells": [list(c) for c in cells], "estimate": fixed.tolist(), "plain": plain.tolist(),
            "exact": exact.tolist(), "key_fixed": agreement(fixed, exact), "no_key_fix": agreement(plain, exact)}


def positions_to_verify(st: PairState, rec: dict, ranked_offsets: list[int], n: int, seed: int = 0) -> list[int]:
    """Downstream slots patched exactly on a long prompt: the ranked offsets' slots, the
    pair's own ``n`` largest estimates and ``n`` random others."""
    down = st.field_onward
    pp = rec["per_position"]
    ranked = [st.n_ctx - o for o in ranked_offsets if st.n_ctx - o in pp]
    own = sorted(down, key=lambda q: -abs(pp[q]))[:n]
    keep = list(dict.fromkeys(ranked + own))
    rng = random.Random(seed * 104729 + st.pair.variant)
    rest = [q for q in down if q not in set(keep)]
    return sorted(keep + rng.sample(rest, min(n, len(rest))))


def summary_of(checks: list[dict], position_checks: list[dict], seed: int) -> dict:
    """Agreement over pairs (bootstrap intervals), key-fixed and plain, cells and positions."""
    return {"cells": summarize([c["key_fixed"] for c in checks], seed=seed),
            "cells_no_key_fix": summarize([c["no_key_fix"] for c in checks], seed=seed),
            "positions": summarize(position_checks, seed=seed), "n_pairs": len(checks)}


def heatmap(states: list[PairState], records: dict, rm: roles.Roles | None = None) -> dict:
    """Mean estimated recovery per (layer, slot), slots from the field to the decision, pooled
    by role (:meth:`circuits.roles.Roles.pool`: the first pair's slots, each the mean over the pairs
    that have its role): the attribution counterpart of the exact KV heatmap."""
    grids = [records[id(s)]["cells"][:, s.field_onward].tolist() for s in states]
    rm = rm or roles.Roles(states)
    return {**rm.pool(states, grids, [s.field_onward for s in states]), "method": "attribution"}
