"""Position selectors resolved from text through the tokenizer's character offsets.

A selector names token positions (slot indices, 0 = first token of the prompt) without
counting tokens by hand: ``Span("order_status: shipped")`` covers exactly the tokens of that
text and refuses a boundary that falls inside a token. Selectors are frozen data; they are
resolved against a :class:`TokenView` (the prompt's ids, strings and offsets) and the same
selector works in a forward, inside ``generate`` (absolute slots) and on a cache.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class SpanError(ValueError):
    """A text span that is missing from the prompt or whose boundary falls inside a token."""


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
    """Base class of position selectors."""

    def resolve(self, view: TokenView) -> list[int]:
        raise NotImplementedError

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        return {"type": type(self).__name__, **{k: _jsonable(v) for k, v in d.items()}}


def _jsonable(v):
    if isinstance(v, Selector):
        return v.to_json()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if callable(v):
        raise TypeError("Where(fn) holds a Python function and cannot be serialized; use Pos or Span")
    return v


@dataclass(frozen=True)
class All(Selector):
    """Every position of every forward (including each decode step)."""

    def resolve(self, view: TokenView) -> list[int]:
        return list(range(len(view)))


@dataclass(frozen=True, init=False)
class Pos(Selector):
    """Absolute slot indices (also past a cache); negative ones count from the end of the prompt."""

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

    def resolve(self, view: TokenView) -> list[int]:
        return [len(view) - 1]


@dataclass(frozen=True)
class Range(Selector):
    """Slots ``start <= i < stop``; ``stop=None`` runs to the end of the prompt."""

    start: int
    stop: int | None = None

    def resolve(self, view: TokenView) -> list[int]:
        n = len(view)
        stop = n if self.stop is None else (self.stop + n if self.stop < 0 else self.stop)
        start = self.start + n if self.start < 0 else self.start
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

    def resolve(self, view: TokenView) -> list[int]:
        a, b = self.char_range(view)
        return view.char_span_to_tokens(a, b, what=f"span {self.text!r}")


@dataclass(frozen=True)
class After(Selector):
    """Every prompt token after the end of ``anchor`` (the downstream of a field)."""

    anchor: Selector

    def resolve(self, view: TokenView) -> list[int]:
        last = max(self.anchor.resolve(view))
        return list(range(last + 1, len(view)))


DELIMITER_CHARS = string.punctuation + string.whitespace


@dataclass(frozen=True)
class Delims(Selector):
    """Delimiter tokens: tokens made only of punctuation and whitespace (newlines, ``:``, ``.``).

    ``chars`` replaces the delimiter alphabet; ``within`` restricts to a sub-selector.
    """

    chars: str = DELIMITER_CHARS
    within: Selector | None = None

    def resolve(self, view: TokenView) -> list[int]:
        pool = self.within.resolve(view) if self.within is not None else range(len(view))
        out = []
        for i in pool:
            a, b = view.offsets[i]
            piece = view.text[a:b]
            if b > a and all(c in self.chars for c in piece):
                out.append(i)
        return out


@dataclass(frozen=True)
class Where(Selector):
    """Positions where ``fn(index, token_string)`` is true. Not serializable."""

    fn: Callable[[int, str], bool] = field(compare=False)

    def resolve(self, view: TokenView) -> list[int]:
        return [i for i, t in enumerate(view.tokens) if self.fn(i, t)]


SELECTORS = {c.__name__: c for c in (All, Pos, Last, Range, Span, After, Delims)}


def selector_from_json(d: dict) -> Selector:
    kind = d.get("type")
    if kind not in SELECTORS:
        raise ValueError(f"unknown position selector {kind!r}; known: {sorted(SELECTORS)}")
    args = {k: v for k, v in d.items() if k != "type"}
    if kind == "Pos":
        return Pos(*args["indices"])
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


def resolve(at, view: TokenView | None, n_tokens: int | None = None) -> list[int] | None:
    """Absolute slots named by ``at``; None means all positions (also decode steps).

    Selectors other than ``Pos`` resolve within ``view`` and are shifted by ``view.start``.
    Text-based selectors need ``view``; ``Pos``/``Range``/``Last`` need only the prompt length.
    """
    sel = as_selector(at)
    if isinstance(sel, All):
        return None
    if view is None:
        if n_tokens is None or isinstance(sel, (Span, Delims, Where, After)):
            raise SpanError(f"{type(sel).__name__} needs the prompt text; pass a string prompt, not ids")
        view = TokenView("", tuple(range(n_tokens)), ("",) * n_tokens, ((0, 0),) * n_tokens)
    if isinstance(sel, Pos):
        return sel.resolve(view)
    return [view.start + i for i in sel.resolve(view)]
