"""Layer x position patching of the residual stream, computed only where it can change.

``resid_patch_grid`` answers, for every layer ``l`` and position ``p``: what does the metric
read when the CLEAN run's residual stream entering layer ``l`` (``resid_pre``) at ``p``
replaces the CORRUPT run's? It is the grid of TransformerLens's
``get_act_patch_resid_pre``, computed with three exact shortcuts:

- before the first token where the prompts differ the two runs are identical, so a patch
  there writes the value already present: the cell is the unpatched metric (no forward);
- a patch at ``(l, p)`` leaves layers below ``l`` and positions before ``p`` untouched, so
  each cell runs only layers ``l..`` over positions ``p..`` (:func:`notekv.lean.forward_from`)
  reusing the corrupt run's K/V for the earlier slots;
- cells of one layer run as batch rows, in blocks of nearby positions sharing a start.

``method="hooks"`` computes every requested cell by hooked forwards instead (batch rows of
``block`` cells, no shortcuts): the plain batched sweep, and the path of families the lean
forward does not cover.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

import notekv as nk
from notekv.lean import forward_from, lean_support


def first_diff_of(a: Sequence[int], b: Sequence[int]) -> int:
    """The first position where two aligned prompts differ (their length if nowhere)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


@torch.no_grad()
def resid_patch_grid(model: nk.HookedModel, corrupt: Sequence[int], clean: Sequence[int],
                     metric: Callable[[torch.Tensor], torch.Tensor], *, layers: Sequence[int] | None = None,
                     positions: Sequence[int] | None = None, block: int = 8, method: str = "auto",
                     progress: bool = True) -> torch.Tensor:
    """``[len(layers), len(positions)]`` metric values of patching ``clean``'s ``resid_pre``
    into the ``corrupt`` run, one (layer, position) at a time.

    ``corrupt``/``clean``: token ids of equal length; ``metric``: last-token logits
    ``[B, vocab]`` -> ``[B]``; ``layers``/``positions``: default all; ``block``: positions per
    batched forward; ``method``: ``"lean"`` (the shortcuts), ``"hooks"`` (a hooked forward
    for every cell) or ``"auto"`` (lean where the family supports it).
    """
    if method not in ("auto", "lean", "hooks"):
        raise ValueError(f"method {method!r}: choose 'auto', 'lean' or 'hooks'")
    reason = lean_support(model)
    if method == "lean" and reason:
        raise ValueError(f"method='lean' cannot run {model.name}: {reason}")
    fast = method == "lean" or (method == "auto" and reason is None)
    corrupt, clean = [int(t) for t in corrupt], [int(t) for t in clean]
    if len(corrupt) != len(clean):
        raise ValueError(f"prompts of {len(corrupt)} and {len(clean)} tokens: patching needs aligned prompts")
    n, L = len(corrupt), model.spec.n_layers
    layers = list(range(L)) if layers is None else list(layers)
    positions = list(range(n)) if positions is None else list(positions)
    bad = [p for p in positions if not 0 <= p < n] + [l for l in layers if not 0 <= l < L]
    if bad:
        raise IndexError(f"out of range: {bad} (the prompt has {n} tokens, the model {L} layers)")
    sites = [f"L{l}.resid_pre" for l in sorted(set(layers))]
    run_c = model.run(torch.tensor([corrupt]), collect=sites, logits="last")
    run_k = model.run(torch.tensor([clean]), collect=sites, logits="last")
    base = float(metric(run_c.logits[:, -1].float())[0])
    d = first_diff_of(corrupt, clean) if fast else 0
    grid = torch.full((len(layers), len(positions)), base)
    live = sorted({p for p in positions if p >= d})
    blocks = [live[i : i + block] for i in range(0, len(live), block)]
    cache = nk.KVCache.from_run(run_c, model) if fast else None
    col = {p: [j for j, q in enumerate(positions) if q == p] for p in live}
    for i, l in enumerate(tqdm(layers, desc="resid_pre grid", disable=not progress)):
        old, new = run_c.acts[f"L{l}.resid_pre"], run_k.acts[f"L{l}.resid_pre"]
        for blk in blocks:
            start = blk[0] if fast else 0
            x = old[:, start:].expand(len(blk), -1, -1).clone()
            for r, p in enumerate(blk):
                x[r, p - start] = new[0, p]
            if fast:
                logits = forward_from(model, x, l, torch.arange(start, n), cache, past_slots=start)
            else:
                logits = _hooked(model, corrupt, l, x)
            vals = metric(logits.float())
            for r, p in enumerate(blk):
                grid[i, col[p]] = float(vals[r])
    return grid


def _hooked(model, ids: list[int], layer: int, resid: torch.Tensor) -> torch.Tensor:
    """The fallback: full forwards with layer ``layer``'s input replaced by ``resid``."""
    batch = torch.tensor([ids]).expand(resid.shape[0], -1)
    patch = nk.Hook(f"L{layer}.resid_pre", lambda t, *, hook: resid.to(t))
    return model.run(batch, interventions=[patch], logits="last").logits[:, -1]
