"""The patching battery on prefilled pairs: KV patching by region, position, layer and
suffix/prefix fraction; ranked vs random position sets; graded knockout; the decision
query's attention mass by region; activation patching of resid / attn_out / mlp_out.

Every function takes :class:`~circuits.pairstate.PairState` objects and returns plain
numbers (recoveries ``(s_P - s_old) / (s_new - s_old)``) so that statistics and the report
stay separate. Batched: one decode step scores many patch sets as batch rows.
"""

from __future__ import annotations

import math
import random
import warnings

import torch

import notekv as nk
from notekv.sweep import resid_patch_grid

from notekv.runner import RowInterventions, logit_diff, run_variants

from .pairstate import PairState, decide, slot_mask

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


def downstream_slots(st: PairState) -> list[int]:
    """Deprecated: :attr:`PairState.field_onward` (the field and its downstream)."""
    warnings.warn("circuits.sweeps.downstream_slots is PairState.field_onward ('downstream' means after the field)",
                  DeprecationWarning, stacklevel=2)
    return st.field_onward


def after_slots(st: PairState) -> list[int]:
    """Deprecated: :attr:`PairState.downstream` (the slots after the field)."""
    warnings.warn("circuits.sweeps.after_slots is PairState.downstream", DeprecationWarning, stacklevel=2)
    return st.downstream


def kv_battery(model: nk.HookedModel, st: PairState, positions: list[int] | None = None) -> dict:
    """Region, per-position, per-layer and cumulative-fraction KV patching for one pair.
    ``positions``: the downstream slots patched one at a time (default all of them; a long
    prompt patches the ones attribution ranks, and a random sample)."""
    down, after = st.field_onward, st.downstream
    single = down if positions is None else [q for q in down if q in set(positions)]
    L = st.old.n_layers
    named = {
        "stale": slot_mask(st, []),
        "field_only": slot_mask(st, st.pair.span_slots),
        "downstream": slot_mask(st, down),  # the paper's "downstream" row: the field and after it
        "after_field": slot_mask(st, after),
    }
    masks = list(named.values())
    masks += [slot_mask(st, [p]) for p in single]
    masks += [slot_mask(st, down, layers=[l]) for l in range(L)]
    n, m = len(down), len(single)
    suffix = [down[n - max(1, math.ceil(f * n)) :] for f in FRACTIONS]
    prefix = [down[: max(1, math.ceil(f * n))] for f in FRACTIONS]
    masks += [slot_mask(st, s) for s in suffix] + [slot_mask(st, s) for s in prefix]
    rec = st.recovery(decide(model, st, torch.stack(masks))).tolist()
    k = len(named)
    out = {name: rec[i] for i, name in enumerate(named)}
    out["per_position"] = dict(zip(single, rec[k : k + m]))
    out["per_layer"] = rec[k + m : k + m + L]
    out["suffix_fraction"] = rec[k + m + L : k + m + L + len(FRACTIONS)]
    out["prefix_fraction"] = rec[k + m + L + len(FRACTIONS) :]
    return out


def offsets(st: PairState, slots) -> list[int]:
    """Distance of each slot from the decision token (1 = the token just before it)."""
    return [st.n_ctx - s for s in slots]


def ranked_vs_random(model: nk.HookedModel, st: PairState, ranking: list[int], ks, draws: int = 5,
                     seed: int = 0) -> dict:
    """Recovery of the top-k offsets of ``ranking`` (held-out) vs k random downstream slots."""
    down = st.field_onward
    by_offset = {st.n_ctx - s: s for s in down}
    rng = random.Random(seed * 9973 + st.pair.variant)
    masks, index = [], []
    for k in ks:
        top = [by_offset[o] for o in ranking if o in by_offset][:k]
        masks.append(slot_mask(st, top))
        index.append(("top", k))
        for _ in range(draws):
            masks.append(slot_mask(st, rng.sample(down, min(k, len(down)))))
            index.append(("random", k))
    rec = st.recovery(decide(model, st, torch.stack(masks))).tolist()
    out: dict = {"top": {}, "random": {}}
    for (kind, k), r in zip(index, rec):
        out[kind].setdefault(k, []).append(r)
    return {"top": {k: v[0] for k, v in out["top"].items()},
            "random": {k: sum(v) / len(v) for k, v in out["random"].items()}}


def graded_knockout(model: nk.HookedModel, st: PairState, ranking: list[int], fractions=(0.0, 0.1, 0.25, 0.5, 1.0)) -> dict:
    """Field-only cache (NEW field K/V, stale notes) with the decision query forbidden from
    the top fraction of ranked downstream keys (after the field), at every layer."""
    after = st.downstream
    by_offset = {st.n_ctx - s: s for s in after}
    ordered = [by_offset[o] for o in ranking if o in by_offset]
    ordered += [s for s in reversed(after) if s not in ordered]
    field_only = slot_mask(st, st.pair.span_slots)[None]
    out = {}
    for f in fractions:
        keys = ordered[: math.ceil(f * len(ordered))]
        ivs = [nk.Knockout(src=nk.Pos(keys), dst=nk.Pos(st.n_ctx), layers="all")] if keys else []
        s = float(decide(model, st, field_only, interventions=ivs)[0])
        out[f] = {"recovery": float(st.recovery(s)), "flipped": s * st.pair.expect_new > 0}
    return out


def attention_mass(model: nk.HookedModel, st: PairState) -> dict:
    """Share of the OLD decision query's attention on each region, averaged over heads,
    per layer and overall. Regions: sink (slot 0), policy, examples, field, downstream, self."""
    L = st.old.n_layers
    ids = torch.tensor([[st.pair.old_ids[-1]]])
    run = model.run(ids, past=st.old, collect=[f"L{l}.attn.pattern" for l in range(L)], logits="last")
    regions = dict(st.region_slots)
    regions["self"] = [st.n_ctx]
    per_layer = {r: [] for r in regions}
    for l in range(L):
        row = run[f"L{l}.attn.pattern"][0, :, -1, :].mean(0)  # [S+1]
        for r, slots in regions.items():
            per_layer[r].append(float(row[slots].sum()))
    return {"per_layer": per_layer, "mean": {r: sum(v) / L for r, v in per_layer.items()}}


# ---------------------------------------------------------------------- activation patching
def _tail(st: PairState):
    """Slots from the edited span to the decision, and the shared prefix cache before them."""
    start = min(st.pair.span_slots)
    return start, st.old.select(range(start))


def activation_patching(model: nk.HookedModel, st: PairState, sites=("resid_pre", "attn_out", "mlp_out"),
                        heatmap_site: str | None = "resid_pre") -> dict:
    """Per-layer recovery of patching NEW's activation at every tail position (one site at a
    time), and, for ``heatmap_site``, the layer x position grid (one position at a time)."""
    L = model.spec.n_layers
    start, prefix = _tail(st)
    old_tail = torch.tensor([st.pair.old_ids[start:]])
    new_tail = torch.tensor([st.pair.new_ids[start:]])
    hooked_heatmap = heatmap_site if heatmap_site not in (None, "resid_pre") else None
    wanted = tuple(sites) + ((hooked_heatmap,) if hooked_heatmap and hooked_heatmap not in sites else ())
    names = [f"L{l}.{s}" for l in range(L) for s in wanted]
    clean = model.run(new_tail, past=prefix, collect=names, logits="last")
    n = old_tail.shape[1]
    p = st.pair
    out: dict = {"tail_slots": list(range(start, start + n))}

    tail_ids = p.old_ids[start:]

    def score(n_rows: int, ivs_of) -> list[float]:
        """Recovery per row; ``ivs_of(rows)`` gives the interventions of a chunk of rows."""
        s = run_variants(model, tail_ids, RowInterventions(n_rows, ivs_of), logit_diff(p.good, p.bad), past=prefix)
        return st.recovery(s).tolist()

    tail = nk.Range(start, None)
    for s in sites:  # rows = layers; row l patches layer l at every tail position
        def per_layer(part, s=s):
            return [nk.Patch(f"L{l}.{s}", clean, at=nk.PerRow([tail if b == l else nk.Pos() for b in part]))
                    for l in part]
        out[f"per_layer_{s}"] = score(L, per_layer)
    if heatmap_site == "resid_pre":  # exact shortcuts of the library's grid (notekv.sweep)
        grid = resid_patch_grid(model, p.old_ids, p.new_ids, lambda lg: st.recovery(lg[:, p.good] - lg[:, p.bad]),
                                slots=out["tail_slots"], progress=False)
        out["heatmap"] = grid.tolist()
    elif heatmap_site:
        slots = out["tail_slots"]

        def at_positions(part, l):  # rows = positions
            return [nk.Patch(f"L{l}.{heatmap_site}", clean, at=nk.PerRow([nk.Pos(slots[i]) for i in part]))]
        out["heatmap"] = [score(n, lambda part, l=l: at_positions(part, l))
                          for l in range(L)]  # [L][n]
    return out
