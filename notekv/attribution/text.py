"""KV attribution from text, in the shape of an exact sweep: ``kv_attribution(model, old,
new, answers=...)`` returns a :class:`~notekv.Sweep` (layers x slots, values
``m_old + estimate``) that can be checked against exact patching on the spot."""

from __future__ import annotations

import random

import torch

from ..errors import InputError, check_int
from ..kv import KVCache
from ..sweep import Sweep, _ids_of, answer_ids, first_diff_of
from .agreement import agreement
from .exact import exact_kv
from .kv import PARTS, attribute_kv


def kv_attribution(model, old, new, *, answers, part: str = "kv", verify: int = 0, seed: int = 0) -> Sweep:
    """Attribution of NEW's cache cells into OLD's at the decision (the last token): a
    :class:`~notekv.Sweep` over (layer, slot) with every KV head of a cell patched together.

    ``part``: ``"kv"`` (K and V, key-fixed), ``"k_fixed"``, ``"k"``, ``"v"`` or
    ``"kv_plain"``. ``verify=N``: also patch exactly the ``N`` cells of largest estimate and
    ``N`` random live cells (after the first differing token) and put their agreement
    (Spearman, top-k overlap, recall) and the exact values under ``meta["verify"]``.
    """
    if part not in PARTS:
        raise InputError(f"part={part!r}: choose one of {PARTS}")
    verify = check_int("verify", verify, low=0)
    seed = check_int("seed", seed)
    good, bad = answer_ids(model, answers)
    o_ids, o_view = _ids_of(model, old, "old")
    n_ids, _ = _ids_of(model, new, "new")
    if len(o_ids) != len(n_ids) or len(o_ids) < 2:
        raise InputError(f"old has {len(o_ids)} tokens and new {len(n_ids)}: attribution needs aligned prompts of "
                         "equal length, at least 2 tokens (context + decision)")
    caches = [KVCache.from_run(model.run(torch.tensor([ids[:-1]]), logits="last"), model) for ids in (o_ids, n_ids)]
    att = attribute_kv(model, caches[0], caches[1], o_ids[-1], good, bad)
    est = att.cells(part)[0].cpu()  # [L, S]
    m_old = float(att.s_old[0])
    last = model.run(torch.tensor([[n_ids[-1]]]), past=caches[1], logits="last").logits[0, -1]
    m_new = float(last[good] - last[bad])
    L, S = est.shape
    tokens = list(o_view.tokens) if o_view is not None else [model.tokenizer.decode([t]) for t in o_ids]
    meta = {"model": model.name, "method": "attribution", "part": part, "first_diff": first_diff_of(o_ids, n_ids)}
    if verify:
        which = {"kv": "kv", "kv_plain": "kv", "k": "k", "k_fixed": "k", "v": "v"}[part]
        d = meta["first_diff"]
        live = [(l, p) for l in range(L) for p in range(d, S)]
        ranked = sorted(live, key=lambda c: -abs(float(est[c])))[:verify]
        rest = [c for c in live if c not in set(ranked)]
        cells = ranked + random.Random(seed).sample(rest, min(verify, len(rest)))
        exact = exact_kv(model, caches[0], caches[1], o_ids[-1], good, bad, cells, which=which)
        ests = torch.tensor([float(est[c]) for c in cells])
        meta["verify"] = {"cells": [list(c) for c in cells], "estimate": ests.tolist(), "exact": exact.tolist(),
                          "n_top": len(ranked), **agreement(ests, exact)}
    site = {"kv": "kv", "kv_plain": "kv", "k": "kv.k", "k_fixed": "kv.k", "v": "kv.v"}[part]
    return Sweep(site, list(range(L)), list(range(S)), tokens[:S], m_old + est, m_old, m_new, meta)
