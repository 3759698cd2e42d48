"""``EditableContext``: a document with named fields, prefilled once, edited by mode.

>>> ctx = EditableContext(model, "status: {status}\\nNote: ok.\\n", fields={"status": "open"},
...                       cue="Decision:", choices=["yes", "no"]).prefill()
>>> st = ctx.edit("status", "closed", mode="field+erratum")
>>> st.decide().choice, st.cost.tokens, st.fidelity()["kl"]

Every edit returns a new :class:`EditState`; the context's prefilled cache is never written.
A state knows the true current values (``values``), what its cached document text says
(``doc_values``: stale under append-only modes), how many leading slots are exact
(``clean``: equal to a full prefill of ``doc_values``), what was appended after the document
(errata, hoisted restatements) and the cost of each edit that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from ..kv.cache import KVCache
from .document import EditError, Layout, field_names, parse_template, render
from .modes import check_line_template
from .score import Decision, EditCost, decide

DEFAULT_ERRATUM = ("[STATE UPDATE] {field} has changed to {value}; this overrides any earlier value and any "
                   "earlier conclusion.")
DEFAULT_HOIST = "{field}: {value}"


class EditableContext:
    """A document of text segments and named fields (see :mod:`notekv.edit.document`).

    ``template``: a string with ``{field}`` placeholders or a list of str / :class:`Field`
    segments; ``fields``: initial values. ``cue`` / ``choices``: defaults for
    :meth:`EditState.decide`, the ``auto`` diagnostic and attention rankings. ``erratum`` /
    ``hoist``: text templates with ``{field}``, ``{value}`` and ``{old}``; ``separator`` ends
    each appended line. Call :meth:`prefill` once; then :meth:`edit` (or ``.state.edit``).
    """

    def __init__(self, model, template, fields: Mapping[str, str], *, cue: str | None = None,
                 choices: Sequence[str] | None = None, erratum: str = DEFAULT_ERRATUM, hoist: str = DEFAULT_HOIST,
                 separator: str = "\n"):
        self.model = model
        self.segments = parse_template(template)
        self.fields = field_names(self.segments)
        if not self.fields:
            raise EditError("the template has no {field} placeholder; nothing could be edited")
        extra = [k for k in fields if k not in self.fields]
        if extra:
            raise EditError(f"values given for unknown field(s) {extra}; the template's fields are {list(self.fields)}")
        self.initial = {k: str(v) for k, v in fields.items()}
        for what, tpl in (("erratum", erratum), ("hoist", hoist), ("separator", separator)):
            if not isinstance(tpl, str):
                raise EditError(f"{what}={tpl!r}: pass text ({what} is a {type(tpl).__name__})")
        for what, tpl in (("erratum", erratum), ("hoist", hoist)):
            check_line_template(what, tpl)
        self.layout: Layout = render(model, self.segments, self.initial)  # refuses merges early
        if cue is not None and not isinstance(cue, str):
            raise EditError(f"cue={cue!r}: pass the cue as text (e.g. 'Decision:')")
        if choices is not None and (isinstance(choices, str) or not all(isinstance(c, str) for c in choices)):
            raise EditError(f"choices={choices!r}: pass a list of answer words, e.g. ['yes', 'no']")
        self.cue, self.choices = cue, tuple(choices) if choices is not None else None
        self.erratum, self.hoist, self.separator = erratum, hoist, separator
        self.cache: KVCache | None = None
        self._state: EditState | None = None
        self._layouts: dict = {}
        self._refs: dict = {}

    def __repr__(self) -> str:
        n = len(self.layout)
        return f"EditableContext({n} tokens, fields={list(self.fields)}, prefilled={self.cache is not None})"

    # ------------------------------------------------------------------ layout
    def render(self, values: Mapping[str, str]) -> Layout:
        """The layout of the document with ``values`` (memoized)."""
        key = tuple((k, str(values[k])) for k in self.fields)
        if key not in self._layouts:
            self._layouts[key] = render(self.model, self.segments, dict(key))
        return self._layouts[key]

    def check_field(self, name: str) -> None:
        if name not in self.fields:
            raise EditError(f"unknown field {name!r}; known fields: {list(self.fields)}")

    # ------------------------------------------------------------------ prefill
    def prefill(self) -> "EditableContext":
        """Compute the shared cache once (idempotent); returns the context."""
        if self.cache is None:
            cache = KVCache.prefill(self.model, self.layout.view)
            self.cache = replace(cache, segments=self.layout.segment_labels())
            self._state = EditState(self, dict(self.initial), dict(self.initial), self.layout, self.cache, (),
                                    len(self.layout), "prefill", None, ())
        return self

    @property
    def state(self) -> "EditState":
        """The unedited state (prefills on first use)."""
        self.prefill()
        return self._state

    def edit(self, field_name: str, value: str, mode: str = "in_place", **kw) -> "EditState":
        return self.state.edit(field_name, value, mode, **kw)

    def decide(self, cue: str | None = None, choices: Sequence[str] | None = None, **kw) -> Decision:
        return self.state.decide(cue, choices, **kw)

    def reference(self, values: Mapping[str, str]) -> "EditState":
        """The full-recompute state for ``values``: unchanged leading slots of the shared cache
        reused, everything from the first changed token prefilled (exact; memoized)."""
        unknown = [k for k in values if k not in self.fields]
        missing = [k for k in self.fields if k not in values]
        if unknown or missing:
            raise EditError(f"reference: values for {list(values)}; the document's fields are {list(self.fields)} "
                            f"(unknown: {unknown}, missing: {missing}); give one value per field")
        key = tuple((k, str(values[k])) for k in self.fields)
        if key not in self._refs:
            st = self.state
            for k, v in key:
                if v != st.values[k]:
                    st = st.edit(k, v, mode="full")
            self._refs[key] = st
        return self._refs[key]

    def _defaults(self, cue, choices):
        cue = self.cue if cue is None else cue
        if isinstance(choices, str):
            raise EditError(f"choices={choices!r}: pass a list of answer words, e.g. ['yes', 'no']")
        choices = self.choices if choices is None else tuple(choices)
        if cue is None or choices is None:
            raise EditError("no cue/choices: pass them here or give EditableContext(cue=..., choices=...)")
        return cue, choices


@dataclass(frozen=True, eq=False)
class EditState:
    """One cache state of an :class:`EditableContext` (immutable; edits return new states)."""

    ctx: EditableContext
    values: dict
    doc_values: dict
    layout: Layout
    cache: KVCache
    appended: tuple  # ((kind, text, n_tokens), ...)
    clean: int
    mode: str
    cost: EditCost | None
    history: tuple
    auto: object = None
    selection: dict | None = None  # selective modes: {"rank", "flavour", "order", "chosen"}
    _memo: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (f"EditState(mode={self.mode!r}, values={self.values}, doc_values={self.doc_values}, "
                f"slots={len(self.cache)}, appended={[a[0] for a in self.appended]}, clean={self.clean})")

    @property
    def model(self):
        return self.ctx.model

    @property
    def stale_fields(self) -> list[str]:
        """Fields whose cached document text is not the current value."""
        return [k for k in self.ctx.fields if self.values[k] != self.doc_values[k]]

    # ------------------------------------------------------------------ edit
    def edit(self, field_name: str, value: str, mode: str = "in_place", **kw) -> "EditState":
        """A new state with ``field_name`` set to ``value`` by ``mode``.

        Modes: ``stale``, ``in_place``, ``erratum``, ``field+erratum``, ``hoist``, ``full``,
        ``selective@K`` (kw ``rank="attention"|"deviation"|"random"``, ``flavour="faithful"|
        "oracle"``, ``seed``, ``probe_layer``, ``cue``), ``auto`` (kw ``cue``, ``choices``,
        ``escalate="full"``, ``fallback="full"``). ``template=`` overrides the erratum/hoist text.
        """
        from .modes import apply_mode

        self.ctx.check_field(field_name)
        if not isinstance(value, str):
            raise EditError(f"edit {field_name!r}: value={value!r} is a {type(value).__name__}; field values are text, "
                            f"pass str(value) yourself if that is what you mean")
        if not value.strip():
            raise EditError(f"edit {field_name!r}: value={value!r} is empty or blank; under every mode the field would "
                            "state nothing (an erratum or restatement with no value, a field that cannot be located "
                            "in the tokens). Pass the new value's text")
        return apply_mode(self, field_name, value, mode, **kw)

    def _next(self, cost: EditCost, **changes) -> "EditState":
        memo = self._memo if "cache" not in changes else {}  # decisions depend only on the cache
        return replace(self, cost=cost, history=self.history + (cost,), _memo=memo, auto=None, selection=None,
                       **changes)

    # ------------------------------------------------------------------ read
    def decide(self, cue: str | None = None, choices: Sequence[str] | None = None, space: str | bool = "auto",
               both: bool = True) -> Decision:
        """Score ``choices`` after ``cue`` from this state: each choice's continuation
        log-probability with and without a leading space (``both=False``: only the deciding
        variant). Memoized per state."""
        from .score import _words

        cue, choices = self.ctx._defaults(cue, choices)
        if not isinstance(cue, str):
            raise EditError(f"cue={cue!r}: pass the cue as text (e.g. 'Decision:')")
        _words(choices)
        space = (not cue[-1:].isspace()) if space == "auto" else bool(space)
        key = (cue, tuple(c.strip() for c in choices), space)
        hit = self._memo.get(key)
        if hit is None or (both and hit.agree is None):
            self._memo[key] = decide(self.model, self.cache, cue, choices, space=space, both=both)
        return self._memo[key]

    def generate(self, cue: str | None = None, max_new_tokens: int = 16, **kw):
        """Greedy generation after ``cue`` through ``model.generate(past=self.cache)``."""
        cue = self.ctx.cue if cue is None else cue
        if cue is None:
            raise EditError("generate needs a cue (or EditableContext(cue=...))")
        return self.model.generate(cue, past=self.cache, max_new_tokens=max_new_tokens, **kw)

    def fidelity(self, cue: str | None = None, choices: Sequence[str] | None = None) -> dict:
        """KL (full || this state) of the next-token distribution after the cue, and decision
        agreement, against the full recompute of the current values (:meth:`EditableContext.reference`)."""
        ref = self.ctx.reference(self.values).decide(cue, choices, both=False)
        me = self.decide(cue, choices, both=False)
        return {"kl": me.kl_from(ref), "agree": me.choice == ref.choice, "choice": me.choice,
                "full_choice": ref.choice, "margin": me.margin, "full_margin": ref.margin}

    def text(self) -> str:
        """The text this state's cache holds: the (possibly stale) document and appended lines."""
        return self.layout.text + "".join(a[1] for a in self.appended)
