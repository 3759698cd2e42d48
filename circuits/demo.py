"""A first look at the notes on a bundled model: one aligned pair, KV patching by region,
and residual patching at the field per layer. Printed as a small table by ``notekv demo``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import notekv as nk

POLICY = "Refunds are allowed only if the order status is delivered."
EXAMPLE = "order_status: {status}\nCustomer: Hello, I have a question about my order.\nRefund request: {answer}\n"
SHOTS = [("delivered", "granted"), ("cancelled", "denied"), ("delivered", "granted"), ("cancelled", "denied"),
         ("cancelled", "denied"), ("delivered", "granted"), ("cancelled", "denied"), ("delivered", "granted")]


def refund_prompt(status: str) -> str:
    """The few-shot refund gate: policy line, 8 one-line examples, then the query."""
    shots = "".join(EXAMPLE.format(status=s, answer=a) for s, a in SHOTS)
    query = EXAMPLE.format(status=status, answer="").rstrip(" \n")
    return f"{POLICY}\n{shots}{query}"


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
    """``(s - s_old) / (s_new - s_old)``: 0 = unchanged, 1 = fully moved to the new value."""
    return (s - s_old) / (s_new - s_old)


@torch.no_grad()
def run_demo(model: nk.HookedModel, old: str = "delivered", new: str = "cancelled",
             layers: list[int] | None = None) -> DemoResult:
    """Score ``logit(granted) - logit(denied)`` at the decision for OLD, NEW and patched caches."""
    good, bad = model.token_id(" granted"), model.token_id(" denied")
    old_text, new_text = refund_prompt(old), refund_prompt(new)
    old_view, new_view = model.tokenize(old_text), model.tokenize(new_text)
    if len(old_view) != len(new_view):
        raise ValueError(f"{old!r} and {new!r} tokenize to different lengths; pick aligned values")
    field = nk.Span(f"order_status: {old}", occurrence=-1)
    field_slots = nk.hooks.positions.resolve(field, old_view)
    n = len(old_view)
    old_prefix = model.run(torch.tensor([old_view.ids[:-1]]))
    new_prefix = model.run(torch.tensor([new_view.ids[:-1]]))
    last = torch.tensor([[old_view.ids[-1]]])

    def decide(interventions=(), past=old_prefix) -> float:
        r = model.run(last, past=past, interventions=interventions)
        return float(r.logits[0, -1, good] - r.logits[0, -1, bad])

    s_old, s_new = decide(), decide(past=new_prefix)
    field_only = decide([nk.KVPatch(new_prefix, at=nk.Pos(field_slots))])
    downstream = decide([nk.KVPatch(new_prefix, at=nk.Pos(list(range(field_slots[0], n - 1))))])
    clean = model.run(new_text, collect=[f"L{l}.resid_pre" for l in range(model.spec.n_layers)])
    per_layer = []
    layers = list(range(model.spec.n_layers)) if layers is None else layers
    for l in tqdm(layers, desc="patch resid_pre at the field", leave=False):
        r = model.run(old_text, interventions=[nk.Patch(f"L{l}.resid_pre", clean, at=nk.Pos(field_slots))])
        per_layer.append((l, recovery(float(r.logits[0, -1, good] - r.logits[0, -1, bad]), s_old, s_new)))
    return DemoResult(s_old, s_new, recovery(field_only, s_old, s_new), recovery(downstream, s_old, s_new),
                      per_layer, n, field_slots)


def format_table(model: nk.HookedModel, res: DemoResult, old: str, new: str) -> str:
    lines = [
        f"model {model.name}: {model.spec.model_type}, {model.spec.n_layers} layers; prompt {res.n_tokens} tokens, "
        f"field slots {res.field_slots}",
        f"decision score s = logit(' granted') - logit(' denied'):  OLD ({old}) {res.s_old:+.3f}   "
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
