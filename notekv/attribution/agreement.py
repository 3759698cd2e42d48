"""How well an attribution map ranks cells the way exact patching does.

For one pair, over the cells whose exact effect was computed: Spearman's rank correlation
of the signed effects; the top-k overlap ``|top_k(est) & top_k(exact)| / k`` by magnitude;
and the recall of the exact top-k within the estimate's top ``4k`` (what a prefilter that
verifies ``4k`` cells exactly would keep). Across pairs each gets a bootstrap interval.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..stats import summary

KS = (8, 32)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a, b) -> float:
    """Spearman's rho of two equal-length vectors (nan for fewer than 3 or a constant one)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"spearman: {a.shape} and {b.shape} differ")
    if a.size < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _top(x: np.ndarray, k: int) -> set:
    return set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())


def agreement(estimate, exact, ks: Sequence[int] = KS) -> dict:
    """Spearman, top-k overlap and recall@4k of one pair's cells (1-D, same order)."""
    est = np.asarray(torch.as_tensor(estimate, dtype=torch.float64).reshape(-1))
    ex = np.asarray(torch.as_tensor(exact, dtype=torch.float64).reshape(-1))
    if est.shape != ex.shape:
        raise InputError(f"agreement: {est.size} estimates for {ex.size} exact values")
    out = {"n_cells": int(est.size), "spearman": spearman(est, ex)}
    for k in ks:
        kk = min(k, est.size)
        if kk == 0:
            out[f"top{k}_overlap"] = out[f"recall{k}_at_{4 * k}"] = float("nan")
            continue
        exact_top = _top(ex, kk)
        out[f"top{k}_overlap"] = len(_top(est, kk) & exact_top) / kk
        out[f"recall{k}_at_{4 * k}"] = len(_top(est, min(4 * k, est.size)) & exact_top) / kk
    return out


def summarize(per_pair: Sequence[dict], seed: int = 0) -> dict:
    """Each metric of :func:`agreement` over pairs: mean, bootstrap interval, n pairs."""
    if not per_pair:
        return {}
    keys = [k for k in per_pair[0] if k != "n_cells"]
    out = {k: summary([p[k] for p in per_pair], seed=seed) for k in keys}
    out["n_cells"] = summary([p["n_cells"] for p in per_pair], seed=seed)
    return out
