"""Exact KV patching of chosen cells, the reference attribution is checked against.

Each cell is one row of notekv's batched runner (:func:`notekv.runner.run_variants`): the
OLD cache with NEW's K and/or V at that cell, decoded with the decision token, so a cell
costs what it costs in any exact sweep, on the fastest exact path the model allows. Rows
per forward are bounded by a byte budget.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float

from ..errors import InputError, InputTypeError, check_int
from ..kv import KVCache
from ..runner import KVMix, logit_diff, run_variants

Cell = tuple  # (layer | None, slot) or (layer | None, slot, kv_head); layer None = every layer


def _check_cells(cells, n_layers: int, n_slots: int, n_heads: int) -> list[tuple]:
    if isinstance(cells, (str, bytes, dict)) or not hasattr(cells, "__iter__"):
        raise InputTypeError(f"cells={cells!r:.60}: pass a list of (layer, slot) or (layer, slot, kv_head) tuples")
    out = []
    for c in cells:
        if isinstance(c, (str, bytes)) or not hasattr(c, "__iter__"):
            raise InputTypeError(f"cells: {c!r} is not (layer, slot) or (layer, slot, kv_head); layer None = all layers")
        c = tuple(c)
        if len(c) not in (2, 3):
            raise InputError(f"cells: {c!r} is not (layer, slot) or (layer, slot, kv_head); layer None = all layers")
        layer = None if c[0] is None else check_int("cells layer", c[0])
        slot = check_int("cells slot", c[1])
        head = check_int("cells kv_head", c[2]) if len(c) == 3 and c[2] is not None else None
        if layer is not None and not 0 <= int(layer) < n_layers:
            raise InputError(f"cells: layer {layer} is outside 0..{n_layers - 1}")
        if not 0 <= slot < n_slots:
            raise InputError(f"cells: slot {slot} is outside the cached slots 0..{n_slots - 1}")
        if head is not None and not 0 <= head < n_heads:
            raise InputError(f"cells: KV head {head} is outside 0..{n_heads - 1}")
        out.append((None if layer is None else int(layer), slot, head))
    return out


@torch.no_grad()
def exact_kv(model, old: KVCache, new: KVCache, token: int, good: int, bad: int, cells: Sequence[Cell], *,
             which: str = "kv", budget: int | None = None, method: str = "auto") -> Float[torch.Tensor, "cells"]:
    """``[len(cells)]``: ``s_patched - s_old`` (logits) of decoding ``token`` against ``old``
    with ``new``'s K and/or V (``which``: "kv", "k", "v") at each cell alone. ``old`` and
    ``new``: batch-1 caches of one model and length (float64 result); ``budget``: bytes of
    cache copies one forward may hold (default ``notekv.kv.cache.KV_BUDGET``); ``method``: the
    runner's path (``"auto"``, ``"lean"``, ``"hooks"``; see :func:`notekv.runner.run_variants`)."""
    from ..sweep import token_id_arg

    if not isinstance(old, KVCache) or not isinstance(new, KVCache):
        raise InputTypeError(f"exact_kv: old and new must be KVCaches, got {type(old).__name__} and "
                             f"{type(new).__name__}; build them with KVCache.prefill or KVCache.from_run")
    if old.keys.shape[1] != 1 or new.keys.shape != old.keys.shape:
        raise InputError("exact_kv: old and new must be batch-1 caches of the same shape")
    new.check_model(model)
    if which not in ("kv", "k", "v"):
        raise InputError(f"which={which!r}: choose 'kv', 'k' or 'v'")
    token, good, bad = (token_id_arg(model, name, v) for name, v in (("token", token), ("good", good), ("bad", bad)))
    if good == bad:
        raise InputError(f"good={good} and bad={bad} are the same token id, so logit[good] - logit[bad] is 0 in every "
                         "cell; give two different answer tokens")
    cells = _check_cells(cells, old.n_layers, len(old), model.spec.n_kv_heads)
    metric = logit_diff(good, bad)
    base = model.run(torch.tensor([[token]]), past=old, logits="last").logits[:, -1].float()
    s_old = float(metric(base)[0])
    if not cells:
        return torch.zeros(0, dtype=torch.float64)
    return run_variants(model, [token], KVMix.of_cells(new, cells, which=which), metric, past=old,
                        budget=budget, method=method) - s_old
