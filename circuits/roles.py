"""Slots of different pairs matched by what they are, not by their distance from the decision.

Pairs of one scenario differ in length after the field (a name of one or two tokens, an id of
three or four digits, a value of one or two tokens), so the slot "k before the decision" is a
different token from pair to pair. The report pools slots by *role* instead (:class:`Roles`):

* the field's slots by their place relative to the value, the first slot where OLD and NEW
  differ: ``field-2``, ``field-1`` (the field's name, e.g. ``':'``, the same in OLD and NEW,
  so its K/V cannot carry the change), ``value+0``, ``value+1`` (the value's tokens);
* a slot after the field by its token and its occurrence counted back from the decision:
  ``'.'#1`` is the last ``'.'`` before the decision, ``'.'#2`` the one before it; such a role
  is kept when every pair of the set has it (the text the scenario fixes);
* a slot of text that varies between pairs (a name, an id) by its place after the last kept
  role before it: ``after:' Customer'#1:1`` is the first token after ``' Customer'``, whatever
  the name;
* the decision token's own slot: ``decision``.

Every pooled number carries the count of pairs it pools (a pair without a role, e.g. a
one-token name for ``after:...:2``, does not enter that role's mean).
"""

from __future__ import annotations

import ast
from collections import Counter

from .pairstate import PairState

DECISION = "decision"
FIELD_END = "field"  # the anchor of varying text right after the field


def _raw(st: PairState) -> dict[int, str]:
    """The field's roles, and each later slot's token with its occurrence counted back."""
    p = st.pair
    first = min(p.diff_slots)
    out = {q: (f"field{q - first:+d}" if q < first else f"value+{q - first}") for q in p.span_slots}
    seen: Counter = Counter()
    for q in reversed(st.downstream):
        tok = p.tokens[q]
        seen[tok] += 1
        out[q] = f"{tok!r}#{seen[tok]}"
    return out


class Roles:
    """The roles of the slots of ``states`` (the pairs a report pools): a token role is kept
    when every pair has it, other slots after the field are named by their place after the last
    kept role before them. Layout only: no outcome enters the roles."""

    def __init__(self, states: list[PairState]):
        raw = [set(_raw(st).values()) for st in states]
        counts = Counter(r for rs in raw for r in rs)
        self.common = frozenset(r for r, c in counts.items() if c == len(states))
        self._of: dict[int, dict[int, str]] = {}

    def of(self, st: PairState, decision: bool = False) -> dict[int, str]:
        """``{slot: role}`` of every slot from the field to the decision (the decision's own
        slot ``st.n_ctx`` too with ``decision``)."""
        if id(st) not in self._of:
            span = set(st.pair.span_slots)
            out, anchor, i = {}, FIELD_END, 0
            for q, r in sorted(_raw(st).items()):
                if q in span or r in self.common:
                    out[q] = r
                    anchor, i = (r, 0) if q not in span else (FIELD_END, 0)
                else:
                    i += 1
                    out[q] = f"after:{anchor}:{i}"
            self._of[id(st)] = out
        out = self._of[id(st)]
        return {**out, st.n_ctx: DECISION} if decision else dict(out)

    def rank(self, per_position: list[dict], states: list[PairState]) -> list[tuple[str, float, int]]:
        """Roles ranked by mean single-slot recovery over the pairs that have them:
        ``[(role, mean, n pairs)]``, best first (ties by role name, for a stable order)."""
        acc = self.values(per_position, states)
        return sorted(((k, sum(v) / len(v), len(v)) for k, v in acc.items()), key=lambda x: (-x[1], x[0]))

    def values(self, per_position: list[dict], states: list[PairState]) -> dict[str, list[float]]:
        """``{role: [value of each pair that has it]}``."""
        out: dict[str, list[float]] = {}
        for pp, st in zip(per_position, states):
            r = self.of(st)
            for slot, v in pp.items():
                out.setdefault(r[slot], []).append(v)
        return out

    def slots(self, st: PairState, roles: list[str]) -> list[int]:
        """The slots of ``roles`` in this pair, in the order given (roles it lacks left out)."""
        where = {r: q for q, r in self.of(st, decision=True).items()}
        return [where[r] for r in roles if r in where]

    def offsets(self, st: PairState, roles: list[str]) -> list[int]:
        """:meth:`slots` as distances from the decision token (1 = the slot just before it)."""
        return [st.n_ctx - q for q in self.slots(st, roles)]

    def tokens(self, role: str, states: list[PairState]) -> list[str]:
        """The distinct tokens ``role`` holds in ``states`` (one for a kept token role)."""
        out: dict[str, None] = {}
        for st in states:
            for q, r in self.of(st).items():
                if r == role:
                    out[st.pair.tokens[q]] = None
        return list(out)

    def layouts(self, states: list[PairState]) -> Counter:
        """How many pairs share each layout (their tokens from the field to the decision)."""
        return Counter(tuple(st.pair.tokens[min(st.pair.span_slots): st.n_ctx]) for st in states)

    def pool(self, states: list[PairState], grids: list, slots_of: list[list[int]], decision: bool = False) -> dict:
        """Columns of per-pair ``[L, len(slots)]`` grids pooled by role: the columns are the
        first pair's slots, each the mean over the pairs that have its role. ``slots_of[i]``
        names the slot of each column of ``grids[i]``. Returns ``grid`` ``[L][C]``, ``roles``,
        ``tokens`` and ``positions`` (the first pair's), ``n_per_column``, ``n`` (pairs),
        ``n_complete`` (pairs that have every column) and ``left_out`` (slots of the other pairs
        whose role the first pair lacks)."""
        ref = states[0]
        ref_roles = self.of(ref, decision=decision)
        ref_slots = [q for q in slots_of[0] if q in ref_roles]
        columns = [ref_roles[q] for q in ref_slots]
        L = len(grids[0])
        sums = [[0.0] * len(columns) for _ in range(L)]
        counts = [0] * len(columns)
        complete = left_out = 0
        for st, grid, sl in zip(states, grids, slots_of):
            roles = self.of(st, decision=decision)
            col_of = {roles[q]: j for j, q in enumerate(sl) if q in roles}
            complete += all(c in col_of for c in columns)
            left_out += len(set(col_of) - set(columns))
            for i, c in enumerate(columns):
                if c in col_of:
                    counts[i] += 1
                    for l in range(L):
                        sums[l][i] += float(grid[l][col_of[c]])
        grid = [[s / n if n else float("nan") for s, n in zip(row, counts)] for row in sums]
        return {"grid": grid, "roles": columns, "tokens": [ref.pair.tokens[q] for q in ref_slots],
                "positions": ref_slots, "n_per_column": counts, "n": len(states), "n_complete": complete,
                "left_out": left_out, "aligned_by": "role"}


def region(role: str) -> str:
    """``field``, ``downstream`` or ``decision``."""
    if role == DECISION:
        return "decision"
    return "field" if role.startswith(("field", "value+")) else "downstream"


def precedes_value(role: str) -> bool:
    """Whether the role's slot comes before the value (its K/V is OLD's = NEW's)."""
    return role.startswith("field-")


def describe(role: str) -> str:
    """Where the role sits, in words."""
    if role == DECISION:
        return "the decision token"
    if role.startswith("field") and role[5:6] in "+-" and role[6:].isdigit():
        return f"field name, {-int(role[5:])} before the value"
    if role.startswith("value+"):
        return f"value token {int(role[6:]) + 1}"
    if role.startswith("after:"):
        anchor, i = role[len("after:"):].rsplit(":", 1)
        if anchor == FIELD_END:
            return f"token {i} of the text that varies right after the field"
        tok, k = anchor.rsplit("#", 1)
        return f"token {i} of the text that varies after {tok} (the {_ordinal(int(k))} counting back)"
    tok, k = role.rsplit("#", 1)
    return f"the {_ordinal(int(k))} {tok} counting back from the decision"


def token_of(role: str) -> str | None:
    """The token a kept token role names (None for the field's, the value's and varying roles)."""
    if role.startswith(("field", "value+", "after:")) or role == DECISION:
        return None
    return ast.literal_eval(role.rsplit("#", 1)[0])


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"
