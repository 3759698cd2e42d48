"""Position selectors resolved from text through the tokenizer's character offsets.

A selector names token positions without counting tokens by hand:
``Span("order_status: shipped")`` covers exactly the tokens of that text and refuses a
boundary that falls inside a token, and a text that occurs more than once unless told which
(``occurrence=``, or ``line=``: ``line=-1`` looks only on the prompt's last line, the query of
a one-line few-shot format); ``span.match(view)`` says which occurrence, on which line. Selectors are frozen data; they are resolved against a
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
from dataclasses import dataclass, field, replace
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
    ``rows``: for a batch of different texts, one view per batch row (this view is row 0's);
    empty when every row is this view. Selectors resolve row ``b`` against ``rows[b]``.
    """

    text: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    start: int = 0
    rows: tuple["TokenView", ...] = field(default=(), compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def batch(cls, views: Sequence["TokenView"]) -> "TokenView":
        """One view of a batch: ``views[0]`` when every row is the same text, else row 0's
        view with ``rows`` holding each row's own."""
        views = [v.row_views()[0] if v.rows else v for v in views]
        first = views[0]
        if all(v == first for v in views[1:]):
            return first
        return replace(first, rows=tuple(views))

    def row_views(self, batch: int | None = None) -> tuple["TokenView", ...]:
        """The view of each batch row (``batch`` rows of this view when it has no ``rows``)."""
        if self.rows:
            return self.rows
        return (replace(self, rows=()),) * (1 if batch is None else batch)

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
class SpanMatch:
    """Where a :class:`Span` resolved in one prompt (:meth:`Span.match`): its ``occurrence``
    (0-based) of the ``count`` appearances it chose among, the characters ``chars``, the
    prompt ``line`` (0-based) they are on with that line's text, and the absolute ``slots``."""

    text: str
    occurrence: int
    count: int
    chars: tuple[int, int]
    line: int
    line_text: str
    slots: tuple[int, ...]

    def __str__(self) -> str:
        return (f"{self.text!r}: occurrence {self.occurrence} of {self.count} (0-based), line {self.line} "
                f"{_clip(self.line_text)!r}, slots {self.slots[0]}..{self.slots[-1]}")


def _clip(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _lines(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character bounds of each line of ``text`` (a final newline ends the
    last line; it does not start an empty one)."""
    out, a = [], 0
    for i, c in enumerate(text):
        if c == "\n":
            out.append((a, i))
            a = i + 1
    if a < len(text) or not out:
        out.append((a, len(text)))
    return out


@dataclass(frozen=True)
class Span(Selector):
    """The tokens of ``text`` in the prompt; refuses (:class:`SpanError`) a text that is absent,
    a boundary that cuts a token, and an ambiguous match.

    ``occurrence``: which appearance, 0-based; negative ones count from the end (-1 = the
    last). None (the default): the text must occur exactly once, and one that occurs more
    than once is refused with where each appearance is, so a repeated text (a field of a
    few-shot example and of the query) never resolves silently to the first; say which.
    ``line``: look only on that line of the prompt (0-based; negative from the end, so
    ``line=-1`` is the query's line of a one-line few-shot format): a text absent from that
    line is refused instead of being found in an earlier example.
    ``span.match(view)`` says where it resolved (occurrence, line, slots).
    """

    text: str
    occurrence: int | None = None
    line: int | None = None

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise SpanError(f"Span text={self.text!r}: pass the text whose tokens to select")
        for name in ("occurrence", "line"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise SpanError(f"Span {name}={v!r}: pass an int (0-based, negative from the end) or None")

    def _where(self, view: TokenView) -> tuple[list[int], str]:
        """Start characters of every appearance of the text (on ``line`` if given) and how the
        searched region reads in messages."""
        if not self.text:
            raise SpanError("Span text='': an empty text covers no token; pass the text whose tokens to select")
        text, lo, hi, region = view.text, 0, len(view.text), "the prompt"
        if self.line is not None:
            lines = _lines(text)
            if not -len(lines) <= self.line < len(lines):
                raise SpanError(f"span {self.text!r} line={self.line}: the prompt has {len(lines)} line(s) "
                                f"(0..{len(lines) - 1}, or -1 for the last)")
            lo, hi = lines[self.line]
            region = f"line {self.line} {_clip(text[lo:hi])!r}"
        starts, i = [], text.find(self.text, lo)
        while 0 <= i and i + len(self.text) <= hi:
            starts.append(i)
            i = text.find(self.text, i + 1)
        return starts, region

    def _describe(self, view: TokenView, starts: list[int]) -> str:
        lines = _lines(view.text)
        parts = []
        for k, a in enumerate(starts[:6]):
            ln = next(j for j, (x, y) in enumerate(lines) if x <= a <= y)
            parts.append(f"occurrence {k} on line {ln} {_clip(view.text[lines[ln][0]:lines[ln][1]], 50)!r}")
        more = f" (and {len(starts) - 6} more)" if len(starts) > 6 else ""
        return "; ".join(parts) + more

    def char_range(self, view: TokenView) -> tuple[int, int]:
        """Characters ``[start, end)`` of the chosen appearance of the text in ``view.text``."""
        return self._choose(view)[1]

    def _choose(self, view: TokenView) -> tuple[int, tuple[int, int], int]:
        starts, region = self._where(view)
        if not starts:
            where = f"the prompt {_clip(view.text, 80)!r}" if self.line is None else region
            raise SpanError(f"span {self.text!r} not found: it occurs 0 times in {where}")
        if self.occurrence is None:
            if len(starts) > 1:
                raise SpanError(
                    f"span {self.text!r} occurs {len(starts)} times in {region}: {self._describe(view, starts)}. "
                    "Say which: Span(text, occurrence=k) (0-based; -1 = the last), or line= (line=-1: the last "
                    "line), or a longer text that occurs once"
                )
            k = 0
        else:
            if not -len(starts) <= self.occurrence < len(starts):
                raise SpanError(
                    f"span {self.text!r} occurrence {self.occurrence} not found: it occurs {len(starts)} time(s) in "
                    f"{region}" + (f" ({self._describe(view, starts)})" if starts else "")
                )
            k = self.occurrence % len(starts)
        a = starts[k]
        return k, (a, a + len(self.text)), len(starts)

    def match(self, view: TokenView) -> SpanMatch:
        """Where this span resolves in ``view`` (one prompt): which occurrence of how many, on
        which line, at which slots; the same refusals as :meth:`resolve`."""
        if view.rows:
            raise SpanError("Span.match: the view holds a batch of different texts; match each row's view "
                            "(view.row_views())")
        k, (a, b), n = self._choose(view)
        lines = _lines(view.text)
        ln = next(j for j, (x, y) in enumerate(lines) if x <= a <= y)
        slots = tuple(view.start + i for i in view.char_span_to_tokens(a, b, what=f"span {self.text!r}"))
        return SpanMatch(self.text, k, n, (a, b), ln, view.text[lines[ln][0]:lines[ln][1]], slots)

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
    if view is not None and view.rows:
        return _resolve_rows(sel, view.rows)
    if view is None:
        needs_text = [r for r in (sel.rows if isinstance(sel, PerRow) else (sel,)) if isinstance(r, _TEXT_SELECTORS)]
        if n_tokens is None or needs_text:
            name = type(needs_text[0] if needs_text else sel).__name__
            raise SpanError(f"{name} needs the prompt text; pass a string prompt (or prompt= to model.hooks), not ids")
        view = TokenView("", tuple(range(n_tokens)), ("",) * n_tokens, ((0, 0),) * n_tokens, start)
    if isinstance(sel, PerRow):
        return sel.resolve_rows(view)
    return sel.resolve(view)


def _resolve_rows(sel: Selector, views: tuple[TokenView, ...]):
    """``sel`` on a batch of different texts: row ``b`` resolves against ``views[b]`` (a
    :class:`PerRow`'s row ``b`` selector too). One list when every row names the same slots,
    else one list per row."""
    if isinstance(sel, PerRow):
        if len(sel.rows) != len(views):
            from .plan import PlanError

            raise PlanError(f"PerRow has {len(sel.rows)} rows but the forward has {len(views)} batch rows; "
                            "give one selector per row")
        return tuple(r.resolve(v) for r, v in zip(sel.rows, views))
    per = tuple(sel.resolve(v) for v in views)
    return per[0] if all(p == per[0] for p in per[1:]) else per
