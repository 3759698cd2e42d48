"""Built-in edit suite: few-shot gates as data, and the edit cases generated from them.

The gates come from the scenario files (their ``[edit]`` tables, :mod:`circuits.scenarios`),
the same files the circuit reports read; an edit case
is an :class:`~notekv.EditableContext` template with two fields — the gate's field (which
the rule reads) and an irrelevant ``agent`` header field — plus the edit to make and the
values the controls use. Cases differ in the negative value, the example order, the
customer line (names, ids, amounts) and the agent name.

At 135M a gate "works" only as a few-shot copy: the answer after ``<cue>`` moves by 0.1-3
logits with the field, on top of an offset set by the example order. The evaluation
therefore screens each case on the model's own full recomputes (see
:mod:`evals.edits`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from circuits import scenarios
from notekv.errors import InputError, NotFoundError, check_int

def edit_gates() -> dict[str, dict]:
    """The editing form of every built-in scenario that has an ``[edit]`` table (the scenario
    files are the one source of each gate)."""
    out = {}
    for name in scenarios.builtin():
        gate = scenarios.get(name).edit_gate()
        if gate is not None:
            out[name] = gate
    return out


GATES = edit_gates()
AGENTS = ["Ana", "Ben", "Chen", "Eli", "Fay", "Ivan", "Jo", "Kai"]  # one token each with a leading space
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena"]
IRRELEVANT = "agent"


@dataclass(frozen=True)
class EditCase:
    """One edit: in ``template`` set ``field`` from ``old`` to ``new``.

    ``wrong``: a value with ``old``'s label (the wrong-value erratum control);
    ``agent_old``/``agent_new``: the irrelevant field's values; ``positive``: the answer word
    the rule gives for a positive value (``choices[0]``)."""

    gate: str
    index: int
    template: str
    field: str
    old: str
    new: str
    wrong: str
    agent_old: str
    agent_new: str
    cue: str
    choices: tuple[str, str]
    new_positive: bool
    positive_values: tuple[str, ...]

    @property
    def fields(self) -> dict:
        return {self.field: self.old, IRRELEVANT: self.agent_old}

    def is_positive(self, value: str) -> bool:
        return value in self.positive_values

    def label(self, value: str) -> str:
        return self.choices[0] if self.is_positive(value) else self.choices[1]


def _fill(text: str, rng: random.Random) -> str:
    return (text.replace("{name}", rng.choice(NAMES)).replace("{id}", str(rng.randint(1000, 9999)))
            .replace("{amount}", str(rng.randint(5, 500))))


def make_case(gate: str, index: int, seed: int = 0, gates: dict | None = None,
              agents: list[str] | None = None) -> EditCase:
    """Case ``index`` of ``gate``: even indices edit positive -> negative, odd the reverse.
    ``gates`` / ``agents`` replace the built-in data (same keys as :data:`GATES`)."""
    gates = GATES if gates is None else gates
    index, seed = check_int("index", index, low=0), check_int("seed", seed)
    if not isinstance(gate, str) or gate not in gates:
        raise NotFoundError(f"unknown gate {gate!r}; built-in: {sorted(gates)}")
    g = gates[gate]
    rng = random.Random(f"{gate}/{seed}/{index}")
    pos = rng.choice(g["positive"])
    neg = rng.choice(g["negative"])
    request = _fill(rng.choice(g["requests"]), rng)
    order = ["P"] * (g["shots"] // 2) + ["N"] * (g["shots"] - g["shots"] // 2)
    rng.shuffle(order)
    block = f"{g['field']}: {{value}}\n{g['line']}: {request}\n"
    shots = "".join(block.format(value=pos if c == "P" else neg) + f"{g['cue']} "
                    + (g["answers"][0] if c == "P" else g["answers"][1]) + "\n" for c in order)
    agent_old, agent_new = rng.sample(AGENTS if agents is None else agents, 2)
    template = (f"{IRRELEVANT}: {{{IRRELEVANT}}}\n{g['policy']}\n{shots}"
                f"{g['field']}: {{{g['field']}}}\n{g['line']}: {request}\n")
    old, new = (pos, neg) if index % 2 == 0 else (neg, pos)
    others = [v for v in (g["positive"] if old in g["positive"] else g["negative"]) if v not in (old, new)]
    wrong = rng.choice(others) if others else old
    return EditCase(gate, index, template, g["field"], old, new, wrong, agent_old, agent_new, g["cue"],
                    tuple(g["answers"]), new in g["positive"], tuple(g["positive"]))


def cases(gates: list[str], n: int, seed: int = 0, start: int = 0) -> list[EditCase]:
    """``n`` built-in cases spread evenly over ``gates`` (round-robin), indices from ``start``."""
    n, start = check_int("n", n, low=0), check_int("start", start, low=0)
    if isinstance(gates, str) or not gates:
        raise InputError(f"gates={gates!r}: pass a non-empty list of gate names, e.g. ['refund']")
    return [make_case(gates[i % len(gates)], start + i // len(gates), seed) for i in range(n)]
