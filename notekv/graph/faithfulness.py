"""Faithfulness and minimality of ranked circuits (MIB's circuit metrics, at KV level).

Edges are ranked once, on selection pairs, by a key that names the same edge in every pair
(e.g. ``"ch L12 -1 H3"``). On each evaluation pair the top ``k`` keys form the circuit: those
edges at NEW, every other edge at OLD (:func:`notekv.graph.edges.evaluate`); the complement
is the reverse, and a random circuit takes ``k`` of the pair's edges at random. Each gives a
*recovery*, the share of the pair's swing: ``(s_C - s_old) / (s_new - s_old)``.

Over sizes ``k`` (doubling, to every ranked key) this is a curve; its area over the fraction
of ranked edges ``k / N`` (trapezoids from ``(0, 0)``) is the area under the faithfulness
curve. The smallest circuit reaching 80% / 90% of the swing is the first size at which the
mean recovery over evaluation pairs reaches it; its interval comes from resampling the pairs.
The graph freezes what it leaves out (heads at the decision never see each other's changes),
so the whole graph may recover less than the swing: the same sizes are also given against
the whole graph's own recovery.
Every mean has a bootstrap interval over distinct evaluation pairs (``n``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import check_int
from ..stats import summary
from .edges import evaluate

THRESHOLDS = (0.8, 0.9)
N_BOOT = 2000


def sizes_for(n: int) -> list[int]:
    """Circuit sizes 1, 2, 4, ... and ``n`` itself."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n] if n else []


def pair_curve(model, dec, order: Sequence[int], n_edges: int, sizes: Sequence[int], n_random: int,
               rng: np.random.Generator) -> dict:
    """``s`` of the top-``k`` circuits, their complements and ``n_random`` random circuits of
    each size on one pair. ``order``: the pair's flat edge indices in ranked order (edges whose
    key the ranking lacks are left out; the complement includes them); ``n_edges``: all the
    pair's edges. Returns ``{"top": [K], "complement": [K], "random": [K, n_random]}``."""
    order = torch.as_tensor(list(order), dtype=torch.long)
    rand = [[torch.as_tensor(rng.choice(n_edges, size=min(k, n_edges), replace=False)) for _ in range(n_random)]
            for k in sizes]
    rows = []  # (kind, size index, draw)
    for i in range(len(sizes)):
        rows += [("top", i, 0), ("complement", i, 0)] + [("random", i, j) for j in range(n_random)]

    def masks(part: range) -> torch.Tensor:
        out = torch.zeros(len(part), n_edges, dtype=torch.bool)
        for r, (kind, i, j) in enumerate(rows[part.start: part.stop]):
            if kind == "random":
                out[r, rand[i][j]] = True
                continue
            out[r, order[: sizes[i]]] = True
            if kind == "complement":
                out[r] = ~out[r]
        return out
    s = evaluate(model, dec, len(rows), masks)
    res = {"top": [0.0] * len(sizes), "complement": [0.0] * len(sizes), "random": [[0.0] * n_random for _ in sizes]}
    for (kind, i, j), v in zip(rows, s.tolist()):
        if kind == "random":
            res["random"][i][j] = v
        else:
            res[kind][i] = v
    return res


def auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area of ``values`` over ``fractions`` (0..1), starting from (0, 0)."""
    x = np.concatenate([[0.0], np.asarray(fractions, dtype=np.float64)])
    y = np.concatenate([[0.0], np.asarray(values, dtype=np.float64)])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def smallest(sizes: Sequence[int], mean_curve: np.ndarray, threshold: float) -> float:
    """The first size whose mean recovery reaches ``threshold`` (nan if none does)."""
    hit = np.nonzero(mean_curve >= threshold)[0]
    return float(sizes[hit[0]]) if hit.size else math.nan


def minimal(sizes: Sequence[int], per_pair: np.ndarray, threshold: float, seed: int = 0) -> dict:
    """Smallest circuit reaching ``threshold`` of the swing on the mean over pairs
    ``per_pair [n, K]``, with a percentile interval over pair resamples and the share of
    resamples in which any size reaches it."""
    n = per_pair.shape[0]
    k = smallest(sizes, per_pair.mean(0), threshold) if n else math.nan
    rng = np.random.default_rng(seed)
    boots = np.array([smallest(sizes, per_pair[rng.integers(0, n, n)].mean(0), threshold) for _ in range(N_BOOT)]) \
        if n else np.array([])
    hit = boots[np.isfinite(boots)]
    ci = [float(np.quantile(hit, 0.025)), float(np.quantile(hit, 0.975))] if hit.size else [math.nan, math.nan]
    return {"threshold": threshold, "edges": k, "ci": ci, "reached_share": float(hit.size / boots.size) if boots.size
            else math.nan, "n": int(n)}


def summarize(curves: list[dict], sizes: Sequence[int], n_ranked: int, seed: int = 0,
              graph: Sequence[float] | None = None) -> dict:
    """Curves of the evaluation pairs (recoveries, one dict per pair as :func:`pair_curve`
    returns, divided by the swing) -> means with intervals, areas and minimal sizes.
    ``graph``: each pair's recovery with every edge at NEW; with it, the top circuits' share
    of that (``top_of_graph``) and the smallest circuits reaching 80% / 90% of it
    (``minimal_of_graph``)."""
    check_int("n_ranked", n_ranked, low=1)
    frac = [k / n_ranked for k in sizes]
    top = np.array([c["top"] for c in curves])  # [n, K]
    comp = np.array([c["complement"] for c in curves])
    rnd = np.array([np.mean(c["random"], axis=1) for c in curves])
    out = {"sizes": list(sizes), "fractions": frac, "n_ranked": n_ranked, "n": len(curves)}
    for name, arr in (("top", top), ("complement", comp), ("random", rnd)):
        out[name] = [summary(arr[:, i], seed=seed) for i in range(len(sizes))]
        out[f"auc_{name}"] = summary([auc(frac, row) for row in arr], seed=seed)
    out["auc_top_minus_random"] = summary([auc(frac, a) - auc(frac, b) for a, b in zip(top, rnd)], seed=seed)
    out["minimal"] = [minimal(sizes, top, t, seed=seed) for t in THRESHOLDS]
    if graph is not None:  # the same against the whole graph's own recovery (MIB's normalisation by the full model)
        rel = top / np.asarray(graph, dtype=np.float64)[:, None]
        out["top_of_graph"] = [summary(rel[:, i], seed=seed) for i in range(len(sizes))]
        out["minimal_of_graph"] = [minimal(sizes, rel, t, seed=seed) for t in THRESHOLDS]
    return out
