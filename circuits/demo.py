"""A first look at the notes on a bundled model: one aligned pair, KV patching by region,
and residual patching at the field per layer. Printed as a small table by ``notekv demo``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import notekv as nk
from notekv.runner import progress_bar

from . import scenarios

SCENARIO = "refund"  # the scenario whose first pair the demo reads


@dataclass
class DemoResult:
    s_old: float
    s_new: float
    field_only: float
    downstream: float
    per_layer: list[tuple[int, float]]
    n_tokens: int
    field_slots: list[int]


def recovery(s: float, s_old: float, s_new: float) -> float:
    """``(s - s_old) / (s_new - s_old)``: 0 = unchanged, 1 = fully moved to the new value
    (nan when the decision does not move between OLD and NEW)."""
    return (s - s_old) / (s_new - s_old) if s_new != s_old else float("nan")


@torch.no_grad()
def run_demo(model: nk.HookedModel, old: str = "delivered", new: str = "cancelled",
             layers: list[int] | None = None, scenario: str = SCENARIO) -> DemoResult:
    """Score ``logit(good) - logit(bad)`` at the decision of ``scenario``'s first pair (the
    field set to ``old`` / ``new``) for OLD, NEW and patched caches."""
    pair = scenarios.get(scenario).pair(model, 0, old=old, new=new)
    field_slots = list(pair.span_slots)
    n = pair.n
    old_prefix = model.run(list(pair.old_ids[:-1]))
    new_prefix = model.run(list(pair.new_ids[:-1]))
    last = [pair.old_ids[-1]]

    def decide(interventions=(), past=old_prefix) -> float:
        r = model.run(last, past=past, interventions=interventions)
        return float(r.logits[0, -1, pair.good] - r.logits[0, -1, pair.bad])

    s_old, s_new = decide(), decide(past=new_prefix)
    field_only = decide([nk.KVPatch(new_prefix, at=nk.Pos(field_slots))])
    downstream = decide([nk.KVPatch(new_prefix, at=nk.Range(field_slots[0], n - 1))])
    layers = list(range(model.spec.n_layers)) if layers is None else layers
    clean = model.run(list(pair.new_ids), collect=[f"L{l}.resid_pre" for l in layers])
    per_layer = []
    for l in progress_bar(layers, desc="patch resid_pre at the field", leave=False):
        r = model.run(list(pair.old_ids), interventions=[nk.Patch(f"L{l}.resid_pre", clean, at=nk.Pos(field_slots))])
        per_layer.append((l, recovery(float(r.logits[0, -1, pair.good] - r.logits[0, -1, pair.bad]), s_old, s_new)))
    return DemoResult(s_old, s_new, recovery(field_only, s_old, s_new), recovery(downstream, s_old, s_new),
                      per_layer, n, field_slots)


def format_table(model: nk.HookedModel, res: DemoResult, old: str, new: str) -> str:
    lines = [
        f"model {model.name}: {model.spec.model_type}, {model.spec.n_layers} layers; prompt {res.n_tokens} tokens, "
        f"field slots {res.field_slots}",
        f"decision score s = logit(good) - logit(bad):  OLD ({old}) {res.s_old:+.3f}   "
        f"NEW ({new}) {res.s_new:+.3f}",
        "",
        "| cache state at the decision step          | recovery |",
        "|-------------------------------------------|----------|",
        f"| OLD cache, field K/V from NEW (all layers) | {res.field_only:8.3f} |",
        f"| OLD cache, field + downstream K/V from NEW | {res.downstream:8.3f} |",
        "",
        "| layer | recovery, resid_pre patched at the field |",
        "|-------|------------------------------------------|",
    ]
    lines += [f"| {l:5d} | {r:40.3f} |" for l, r in res.per_layer]
    lines.append("")
    lines.append("One pair only: a look, not a measurement (the circuit report gives n and intervals).")
    return "\n".join(lines)
