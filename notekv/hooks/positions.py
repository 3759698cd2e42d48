"""Position selectors resolved from text through the tokenizer's character offsets.

A selector names token positions without counting tokens by hand:
``Span("order_status: shipped")`` covers exactly the tokens of that text and refuses a
boundary that falls inside a token. Selectors are frozen data; they are resolved against a
:class:`TokenView` (the prompt's ids, strings and offsets) and the same selector works in a
forward, inside ``generate`` and on a cache.

One frame for every selector: :meth:`Selector.resolve` returns **absolute slots** (slot 0 is
the first token of the whole context, cache included). ``Pos`` and ``Range`` take absolute
slot numbers (negative ones count back from the end of the prompt); the others find their
tokens in the prompt's text and report where those tokens sit. A view that continues a
cache starts at ``view.start``, so with ``start=10`` and two tokens ``Last()`` and ``Pos(-1)``
both resolve to ``[11]``. ``PerRow(a, b, ...)`` gives each batch row its own selector.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import InputError, InputTypeError


class SpanError(InputError):
    """A text span that is missing from the prompt or whose boundary falls inside a token."""


class SlotError(InputError, IndexError):
    """A selector that names slots outside the context it is applied to."""


class SelectorError(InputTypeError):
    """A position selector built, used or serialized in a way it does not support."""


@dataclass(frozen=True)
class TokenView:
    """A tokenized prompt: ids, decoded token strings and character offsets.

    ``offsets[i] = (start, end)`` in ``text``; special tokens (BOS) have ``(0, 0)``.
    ``start`` is the slot of the first token (non-zero for a continuation after a cache).
    """

    text: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    start: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_text(cls, tokenizer, text: str, *, start: int = 0, special: bool = True) -> "TokenView":
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        ids = tuple(int(i) for i in enc["input_ids"])
        tokens = tuple(tokenizer.decode([i]) for i in ids)
        return cls(text, ids, tokens, tuple((int(a), int(b)) for a, b in enc["offset_mapping"]), start)

    def char_span_to_tokens(self, start: int, end: int, what: str = "span") -> list[int]:
        """Token positions covering characters ``[start, end)``; boundaries must fall between tokens.

        A token's leading whitespace may lie outside the span (``" shipped"`` covers
        ``"shipped"``), since BPE tokenizers attach the space to the following word.
        """
        covered = []
        for i, (a, b) in enumerate(self.offsets):
            if b <= a:  # special token
                continue
            if b <= start or a >= end:
                continue
            core_a = a + (len(self.text[a:b]) - len(self.text[a:b].lstrip()))
            if core_a < start or b > end:
                raise SpanError(
                    f"{what} boundary falls inside token {i} {self.text[a:b]!r} (chars {a}-{b}) for the "
                    f"span chars {start}-{end} {self.text[start:end]!r}: its tokens merge across the "
                    "boundary. Widen the span to whole tokens, or add a separator (space, newline) "
                    "at the boundary in the template."
                )
            covered.append(i)
        if not covered:
            raise SpanError(f"{what} chars {start}-{end} cover no token")
        return covered


class Selector:
    """Base class of position selectors.

    Subclasses implement ``_indices(view)``: indices into the view's tokens (0 = its first
    token); :meth:`resolve` turns them into absolute slots. ``Pos`` and ``Range`` name
    absolute slots directly and override :meth:`resolve`.
    """

    def _indices(self, view: TokenView) -> list[int]:
        raise NotImplementedError

    def resolve(self, view: TokenView) -> list[int]:
        """Absolute slots of the selected tokens (sorted as the selector lists them)."""
        return [view.start + i for i in self._indices(view)]

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        return {"type": type(self).__name__, **{k: _jsonable(v) for k, v in d.items()}}


def _jsonable(v):
    if isinstance(v, Selector):
        return v.to_json()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if callable(v):
        raise SelectorError("Where(fn) holds a Python function and cannot be serialized; use Pos or Span")
    return v


@dataclass(frozen=True)
class All(Selector):
    """Every position of every forward (including each decode step)."""

    def _indices(self, view: TokenView) -> list[int]:
        return list(range(len(view)))


@dataclass(frozen=True, init=False)
class Pos(Selector):
    """Absolute slots (also past a cache); negative ones count back from the end of the prompt
    (``Pos(-1)`` is the prompt's last token, wherever the prompt starts)."""

    indices: tuple[int, ...]

    def __init__(self, *indices: int | Sequence[int]):
        flat: list[int] = []
        for i in indices:
            flat.extend(int(x) for x in (i if isinstance(i, (list, tuple, range)) else [i]))
        object.__setattr__(self, "indices", tuple(flat))

    def resolve(self, view: TokenView) -> list[int]:
        end = view.start + len(view)
        return sorted({i + end if i < 0 else i for i in self.indices})


@dataclass(frozen=True)
class Last(Selector):
    """The last token of the prompt (the decision position)."""

    def _indices(self, view: TokenView) -> list[int]:
        return [len(view) - 1]


@dataclass(frozen=True)
class Range(Selector):
    """Absolute slots ``start <= i < stop``; ``stop=None`` runs to the end of the prompt and
    negative bounds count back from it (``Range(-3)``: the prompt's last three tokens)."""

    start: int
    stop: int | None = None

    def resolve(self, view: TokenView) -> list[int]:
        end = view.start + len(view)
        stop = end if self.stop is None else (self.stop + end if self.stop < 0 else self.stop)
        start = self.start + end if self.start < 0 else self.start
        return list(range(start, stop))


@dataclass(frozen=True)
class Span(Selector):
    """The tokens of ``text`` in the prompt (its ``occurrence``-th appearance, 0-based; -1 = last).

    Raises :class:`SpanError` when the text is absent or a boundary cuts a token.
    """

    text: str
    occurrence: int = 0

    def char_range(self, view: TokenView) -> tuple[int, int]:
        starts, i = [], view.text.find(self.text)
        while i >= 0:
            starts.append(i)
            i = view.text.find(self.text, i + 1)
        if not -len(starts) <= self.occurrence < len(starts):
            raise SpanError(
                f"span {self.text!r} occurrence {self.occurrence} not found: it occurs {len(starts)} time(s) "
                f"in the prompt {view.text[:80]!r}{'...' if len(view.text) > 80 else ''}"
            )
        start = starts[self.occurrence]
        return start, start + len(self.text)

    def _indices(self, view: TokenView) -> list[int]:
        a, b = self.char_range(view)
        return view.char_span_to_tokens(a, b, what=f"span {self.text!r}")


@dataclass(frozen=True)
class After(Selector):
    """Every prompt token after the end of ``anchor`` (the downstream of a field)."""

    anchor: Selector

    def _indices(self, view: TokenView) -> list[int]:
        last = max(self.anchor.resolve(view)) - view.start
        return list(range(last + 1, len(view)))


DELIMITER_CHARS = string.punctuation + string.whitespace


@dataclass(frozen=True)
class Delims(Selector):
    """Delimiter tokens: tokens made only of punctuation and whitespace (newlines, ``:``, ``.``).

    ``chars`` replaces the delimiter alphabet; ``within`` restricts to a sub-selector.
    """

    chars: str = DELIMITER_CHARS
    within: Selector | None = None

    def _indices(self, view: TokenView) -> list[int]:
        pool = ([s - view.start for s in self.within.resolve(view) if 0 <= s - view.start < len(view)]
                if self.within is not None else range(len(view)))
        out = []
        for i in pool:
            a, b = view.offsets[i]
            piece = view.text[a:b]
            if b > a and all(c in self.chars for c in piece):
                out.append(i)
        return out


@dataclass(frozen=True)
class Where(Selector):
    """Tokens where ``fn(index, token_string)`` is true (``index`` counts the prompt's tokens
    from 0). Not serializable."""

    fn: Callable[[int, str], bool] = field(compare=False)

    def _indices(self, view: TokenView) -> list[int]:
        return [i for i, t in enumerate(view.tokens) if self.fn(i, t)]


@dataclass(frozen=True, init=False)
class PerRow(Selector):
    """One selector per batch row: row ``b`` of a batched forward uses ``rows[b]``.

    ``PerRow(Pos(3), Pos(7))`` patches slot 3 in row 0 and slot 7 in row 1 of one forward,
    which is how a sweep runs many cells as batch rows. ``Pos()`` (no slots) leaves a row
    untouched. The forward's batch must have exactly ``len(rows)`` rows.
    """

    rows: tuple[Selector, ...]

    def __init__(self, *rows):
        flat = rows[0] if len(rows) == 1 and isinstance(rows[0], (list, tuple)) else rows
        if not flat:
            raise SelectorError("PerRow(): needs one selector per batch row, got none; e.g. "
                                "PerRow(nk.Last(), nk.Pos(3))")
        sel = tuple(as_selector(r) for r in flat)
        if any(isinstance(r, PerRow) for r in sel):
            raise SelectorError("PerRow(...): a row is itself a PerRow; give each row a plain selector")
        object.__setattr__(self, "rows", sel)

    def resolve(self, view: TokenView) -> list[int]:
        raise SelectorError("PerRow resolves per batch row: use resolve_rows(view)")

    def resolve_rows(self, view: TokenView) -> tuple[list[int], ...]:
        """Absolute slots of each row's selector."""
        return tuple(r.resolve(view) for r in self.rows)

    def to_json(self) -> dict:
        return {"type": "PerRow", "rows": [r.to_json() for r in self.rows]}


SELECTORS = {c.__name__: c for c in (All, Pos, Last, Range, Span, After, Delims, PerRow)}


def selector_from_json(d: dict) -> Selector:
    kind = d.get("type")
    if kind not in SELECTORS:
        raise SelectorError(f"type={kind!r}: unknown position selector; known: {sorted(SELECTORS)}")
    args = {k: v for k, v in d.items() if k != "type"}
    if kind == "Pos":
        return Pos(*args["indices"])
    if kind == "PerRow":
        return PerRow(*[selector_from_json(r) for r in args["rows"]])
    for k, v in args.items():
        if isinstance(v, dict) and "type" in v:
            args[k] = selector_from_json(v)
    return SELECTORS[kind](**args)


def as_selector(at) -> Selector:
    """Coerce ``None`` (all), an int, a list of ints, a string (a span) or a selector."""
    if at is None:
        return All()
    if isinstance(at, Selector):
        return at
    if isinstance(at, str):
        return Span(at)
    if isinstance(at, int):
        return Pos(at)
    if isinstance(at, torch.Tensor):
        return Pos(at.flatten().tolist())
    return Pos(list(at))


_TEXT_SELECTORS = (Span, Delims, Where, After)


def resolve(at, view: TokenView | None, n_tokens: int | None = None, *, start: int = 0):
    """Absolute slots named by ``at``: a list, None for all positions (also decode steps), or
    for a :class:`PerRow` a tuple with one list per batch row.

    Text-based selectors need ``view``; ``Pos``/``Range``/``Last`` need only the prompt length
    ``n_tokens`` (the prompt then starts at slot ``start``).
    """
    sel = as_selector(at)
    if isinstance(sel, All):
        return None
    if view is None:
        needs_text = [r for r in (sel.rows if isinstance(sel, PerRow) else (sel,)) if isinstance(r, _TEXT_SELECTORS)]
        if n_tokens is None or needs_text:
            name = type(needs_text[0] if needs_text else sel).__name__
            raise SpanError(f"{name} needs the prompt text; pass a string prompt (or prompt= to model.hooks), not ids")
        view = TokenView("", tuple(range(n_tokens)), ("",) * n_tokens, ((0, 0),) * n_tokens, start)
    if isinstance(sel, PerRow):
        return sel.resolve_rows(view)
    return sel.resolve(view)
