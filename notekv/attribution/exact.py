"""Exact KV patching of chosen cells, the reference attribution is checked against.

Each cell is one batch row of a decode step: the OLD cache with NEW's K and/or V at that
cell (:class:`~notekv.KVPatch` with per-row positions), so a cell costs what it costs in
any exact sweep. Rows per forward are bounded by a byte budget (every row materialises a
copy of the cache when the decision token is appended).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from ..hooks.interventions import KVPatch
from ..hooks.positions import PerRow, Pos
from ..kv import KVCache

Cell = tuple  # (layer | None, slot) or (layer | None, slot, kv_head); layer None = every layer


def _check_cells(cells, n_layers: int, n_slots: int, n_heads: int) -> list[tuple]:
    out = []
    for c in cells:
        c = tuple(c)
        if len(c) not in (2, 3):
            raise InputError(f"cells: {c!r} is not (layer, slot) or (layer, slot, kv_head); layer None = all layers")
        layer, slot = c[0], int(c[1])
        head = int(c[2]) if len(c) == 3 and c[2] is not None else None
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
             which: str = "kv", budget: int | None = None) -> torch.Tensor:
    """``[len(cells)]``: ``s_patched - s_old`` (logits) of decoding ``token`` against ``old``
    with ``new``'s K and/or V (``which``: "kv", "k", "v") at each cell alone. ``old`` and
    ``new``: batch-1 caches of one model and length (float64 result); ``budget``: bytes of cache copies one
    forward may hold (default ``notekv.kv.cache.KV_BUDGET``)."""
    if old.keys.shape[1] != 1 or new.keys.shape != old.keys.shape:
        raise InputError("exact_kv: old and new must be batch-1 caches of the same shape")
    spec = model.spec
    cells = _check_cells(cells, old.n_layers, len(old), spec.n_kv_heads)
    ids = torch.tensor([[int(token)]])
    base = model.run(ids, past=old, logits="last").logits[0, -1]
    s_old = float(base[good] - base[bad])
    per = old.rows_within(budget)
    out = []
    for i in range(0, len(cells), per):
        chunk = cells[i : i + per]
        ivs = []
        for layer, head in dict.fromkeys((c[0], c[2]) for c in chunk):
            rows = PerRow([Pos(c[1]) if (c[0], c[2]) == (layer, head) else Pos() for c in chunk])
            ivs.append(KVPatch(new, at=rows, layers="all" if layer is None else [layer], heads=head, which=which))
        logits = model.run(ids.expand(len(chunk), -1), past=old.expand(len(chunk)), interventions=ivs,
                           logits="last").logits[:, -1]
        out.append((logits[:, good] - logits[:, bad]).double().cpu() - s_old)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
