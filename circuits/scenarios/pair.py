"""Aligned OLD/NEW pairs: the :class:`Pair` type, the region of each slot, and the alignment
check (equal token length, token ids differing only inside the edited span)."""

from __future__ import annotations

from dataclasses import dataclass

from notekv.hooks.positions import Span, SpanError, TokenView

from .errors import ScenarioError

REGIONS = ("sink", "policy", "examples", "field", "downstream", "decision")  # the label of each slot of a pair


@dataclass(frozen=True)
class Pair:
    """One aligned OLD/NEW pair. ``s = logit[good] - logit[bad]`` at the last slot; the rule
    says its sign should be ``expect_old`` for OLD and ``expect_new`` for NEW."""

    scenario: str
    kind: str
    variant: int
    old: str
    new: str
    old_value: str
    new_value: str
    old_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    span_slots: tuple[int, ...]  # the edited span (the field, or the rule's trigger)
    diff_slots: tuple[int, ...]  # where the token ids differ
    regions: tuple[str, ...]  # per slot: sink, policy, examples (or the scenario's example_region), field,
    #                           downstream, decision
    good: int
    bad: int
    expect_old: int
    expect_new: int

    @property
    def n(self) -> int:
        return len(self.old_ids)

    @property
    def downstream(self) -> list[int]:
        """Slots after the edited span, before the decision slot."""
        return list(range(max(self.span_slots) + 1, self.n - 1))


def align(model, name: str, field: str, values: tuple[str, str], texts: tuple[str, str], spans: tuple[str, str],
          occurrence: int) -> tuple[TokenView, TokenView, list[int], list[int]]:
    """Tokenize the OLD and NEW ``texts`` of scenario ``name`` (``values`` of ``field``) and
    check they align: ``(old view, new view, span slots, diff slots)``. ``spans``: the edited
    span's text in each (its ``occurrence``). Raises :class:`ScenarioError` when the lengths
    differ or the token ids differ outside the span."""
    old, new = values
    ov, nv = model.tokenize(texts[0]), model.tokenize(texts[1])
    if len(ov) != len(nv):
        raise ScenarioError(
            f"scenario {name!r}: values {old!r} and {new!r} of {field!r} tokenize to different "
            f"lengths ({len(ov)} vs {len(nv)} tokens); use values of equal token length"
        )
    try:
        span = Span(spans[0], occurrence=occurrence).resolve(ov)
        Span(spans[1], occurrence=occurrence).resolve(nv)
    except SpanError as err:
        raise ScenarioError(f"scenario {name!r}, value {old!r}/{new!r}: {err}") from None
    diff = [i for i, (a, b) in enumerate(zip(ov.ids, nv.ids)) if a != b]
    if not diff or not set(diff) <= set(span):
        raise ScenarioError(
            f"scenario {name!r}: OLD and NEW differ at slots {diff}, outside the edited span {span} "
            f"({[ov.tokens[i] for i in diff]}); the value merges with neighbouring text"
        )
    return ov, nv, span, diff


def regions(view: TokenView, span: list[int], policy_end: int, example_region: str = "examples") -> tuple[str, ...]:
    """The region of every slot of ``view``: ``sink`` (the first), ``decision`` (the last),
    ``field`` (``span``), ``downstream`` (after it), ``policy`` (text before ``policy_end``)
    and ``example_region`` (the rest)."""
    out = []
    first, last = min(span), max(span)
    for i, (a, _) in enumerate(view.offsets):
        if i == 0:
            out.append("sink")
        elif i == len(view) - 1:
            out.append("decision")
        elif first <= i <= last:
            out.append("field")
        elif i > last:
            out.append("downstream")
        elif a < policy_end:
            out.append("policy")
        else:
            out.append(example_region)
    return tuple(out)
