"""A document of literal text segments and named fields, and where each field's tokens sit.

A document is a template string with ``{field}`` placeholders (``{{`` and ``}}`` for literal
braces) or a list of segments, each a literal string or a :class:`Field`. Rendering it with
values gives a text; tokenizing that text with character offsets gives, for every field
occurrence, the contiguous slots of its tokens (:class:`Layout`). A field whose tokens merge
with the neighbouring template text (a token straddling the boundary) is refused, naming the
field and the fix, because an in-place edit of such a field would also change its neighbours.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import InputError
from ..hooks.positions import SpanError, TokenView


class EditError(InputError):
    """A document, field, value or mode that cannot be edited as asked."""


@dataclass(frozen=True)
class Field:
    """A named placeholder in a segment list."""

    name: str


Segments = tuple  # tuple[str | Field, ...]


def parse_template(template: str | Sequence[str | Field]) -> Segments:
    """Segments of a template string (``{name}`` placeholders) or a segment list."""
    if isinstance(template, str):
        out: list[str | Field] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as err:
            raise EditError(f"template is not a valid format string ({err}); write literal braces as {{{{ }}}}") from None
        for literal, name, spec, conv in parsed:
            if literal:
                out.append(literal)
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise EditError(f"placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                                "is not a plain field name; use {field_name} (no format spec or conversion)")
            out.append(Field(name))
        return tuple(out)
    segs = []
    for s in template:
        if isinstance(s, Field):
            segs.append(s)
        elif isinstance(s, str):
            if s:
                segs.append(s)
        else:
            raise EditError(f"a segment must be a str or notekv.edit.Field, not {type(s).__name__}")
    return tuple(segs)


def field_names(segments: Segments) -> tuple[str, ...]:
    """Field names in order of first appearance."""
    seen: list[str] = []
    for s in segments:
        if isinstance(s, Field) and s.name not in seen:
            seen.append(s.name)
    return tuple(seen)


@dataclass(frozen=True)
class Layout:
    """A rendered document: its text, tokens and, per field, the slots of each occurrence."""

    values: tuple[tuple[str, str], ...]
    text: str
    view: TokenView
    slots: dict  # field -> tuple of tuple[int, ...] (one per occurrence)
    chars: dict  # field -> tuple of (start, end) character spans

    def __len__(self) -> int:
        return len(self.view)

    @property
    def ids(self) -> tuple[int, ...]:
        return self.view.ids

    def field_slots(self, name: str) -> list[int]:
        """Every slot of every occurrence of ``name``."""
        return [s for occ in self.slots[name] for s in occ]

    def segment_labels(self) -> tuple[str, ...]:
        """Per slot: ``"field:<name>"`` inside a field, else ``"doc"``."""
        labels = ["doc"] * len(self)
        for name, occs in self.slots.items():
            for occ in occs:
                for s in occ:
                    labels[s] = f"field:{name}"
        return tuple(labels)


def render(model, segments: Segments, values: Mapping[str, str]) -> Layout:
    """Render ``segments`` with ``values``, tokenize (BOS as for a fresh prompt) and locate fields.

    Raises :class:`EditError` for a missing or empty value, or a field whose tokens merge
    with the neighbouring text.
    """
    names = field_names(segments)
    missing = [n for n in names if n not in values]
    if missing:
        raise EditError(f"no value for field(s) {missing}; the document's fields are {list(names)}")
    parts: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    pos = 0
    for s in segments:
        if isinstance(s, Field):
            v = str(values[s.name])
            if not v.strip():
                raise EditError(f"field {s.name!r}: an empty or blank value cannot be located in the tokens")
            spans[s.name].append((pos, pos + len(v)))
            parts.append(v)
            pos += len(v)
        else:
            parts.append(s)
            pos += len(s)
    text = "".join(parts)
    view = model.tokenize(text)
    slots: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, occs in spans.items():
        found = []
        for k, (a, b) in enumerate(occs):
            try:
                toks = view.char_span_to_tokens(a, b, what=f"field {name!r}")
            except SpanError:
                raise EditError(_merge_message(view, name, k, a, b)) from None
            found.append(tuple(toks))
        slots[name] = tuple(found)
    vals = tuple((n, str(values[n])) for n in names)
    return Layout(vals, text, view, slots, {n: tuple(v) for n, v in spans.items()})


def _merge_message(view: TokenView, name: str, k: int, a: int, b: int) -> str:
    text = view.text
    bad = next(((i, ta, tb) for i, (ta, tb) in enumerate(view.offsets)
                if tb > ta and ta < b and tb > a and (ta + len(text[ta:tb]) - len(text[ta:tb].lstrip()) < a or tb > b)),
               None)
    where = ""
    if bad is not None:
        i, ta, tb = bad
        outside = (text[ta:a].lstrip() + text[b:tb]) or text[ta:tb]
        where = f"token {i} {text[ta:tb]!r} spans the field's edge and the neighbouring text {outside!r}; "
    return (f"field {name!r} (occurrence {k}, value {text[a:b]!r}): {where}its tokens merge with the template text "
            f"around it, so editing it would also change its neighbours. Fix: put a space or newline between "
            f"{{{name}}} and the text around it in the template, or move that text into the value.")


def check_aligned(old: Layout, new: Layout, name: str) -> None:
    """Raise unless ``new`` differs from ``old`` only inside field ``name``'s slots, with the
    same token count (what an in-place edit of ``name`` needs)."""
    old_occ, new_occ = old.slots[name], new.slots[name]
    n_old = [len(o) for o in old_occ]
    n_new = [len(o) for o in new_occ]
    old_v, new_v = dict(old.values)[name], dict(new.values)[name]
    if n_old != n_new or len(old) != len(new):
        toks_old = [old.view.tokens[s] for s in old_occ[0]]
        toks_new = [new.view.tokens[s] for s in new_occ[0]]
        raise EditError(
            f"in_place edit of field {name!r}: the new value {new_v!r} is {n_new[0]} token(s) {toks_new} but the "
            f"old value {old_v!r} is {n_old[0]} token(s) {toks_old}; in_place needs the same token count. "
            "Use mode='full' (exact), 'erratum' (append-only) or 'auto' (falls back)."
        )
    inside = set(old.field_slots(name))
    outside = [i for i, (a, b) in enumerate(zip(old.ids, new.ids)) if a != b and i not in inside]
    if outside:
        i = outside[0]
        raise EditError(
            f"in_place edit of field {name!r} to {new_v!r} changes token {i} outside the field "
            f"({old.view.tokens[i]!r} -> {new.view.tokens[i]!r}): the value merges with its neighbours. "
            f"Put a space or newline around {{{name}}} in the template, or use mode='full'."
        )
