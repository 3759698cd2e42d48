"""The edit modes: how an :class:`~notekv.edit.context.EditState` becomes the next one.

==================  ========================================================================
``stale``           nothing recomputed; the value changes only in ``state.values`` (floor)
``in_place``        the field's tokens recomputed against the unchanged prefix and their K/V
                    overwritten; needs the same token count (else a clear error)
``erratum``         the stale cache, then the erratum line appended (append-only)
``field+erratum``   ``in_place`` then the erratum line
``hoist``           the stale cache, then the current value restated (``"{field}: {value}"``)
``selective@K``     ``in_place`` plus K downstream slots, ranked by ``attention`` (the cue's
                    attention on the in-place state), ``deviation`` (K/V drift in a shallow
                    probe) or ``random``; ``faithful`` recomputes them against the partly stale
                    cache (:func:`~notekv.edit.ops.recompute_selected`), ``oracle`` copies them
                    from a full recompute (an upper bound that needs the full recompute)
``full``            every slot from the first changed (or first inexact) token recomputed;
                    appended lines dropped (ceiling)
``auto``            a per-edit diagnostic, see :func:`auto`
==================  ========================================================================

Compact names accepted by ``mode=``: ``"selective@8"``, ``"selective@8:deviation"``,
``"selective@8:random:oracle"``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field, replace

from . import ops
from .document import EditError, check_aligned
from .score import EditCost, decision_tokens

MODES = ("stale", "in_place", "erratum", "field+erratum", "hoist", "selective@K", "full", "auto")
RANKS = ("attention", "deviation", "random")
FLAVOURS = ("faithful", "oracle")


def check_line_template(what: str, template) -> str:
    """``template`` if it is text whose only placeholders are ``{field}``, ``{value}`` and
    ``{old}`` (the erratum and hoist lines), else :class:`EditError` naming it."""
    if not isinstance(template, str):
        raise EditError(f"{what}={template!r}: pass a text template with {{field}}, {{value}} and {{old}}")
    try:
        template.format(field="f", value="v", old="o")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise EditError(f"{what}={template!r}: not a line template ({type(err).__name__}: {err}); use only the "
                        "placeholders {field}, {value} and {old}, and write literal braces as {{ }}") from None
    return template


def parse_mode(mode: str, kw: dict) -> tuple[str, dict]:
    """``(base_mode, kwargs)``; expands ``selective@K[:rank[:flavour]]``."""
    if not isinstance(mode, str):
        raise EditError(f"mode={mode!r}: pass a mode name, one of {', '.join(MODES)} (selective as e.g. "
                        "'selective@8')")
    if mode.startswith("selective@"):
        parts = mode[len("selective@"):].split(":")
        try:
            k = int(parts[0])
        except ValueError:
            raise EditError(f"mode {mode!r}: write selective@K with an integer K, e.g. 'selective@8'") from None
        kw = dict(kw, k=k)
        if len(parts) > 1:
            kw["rank"] = parts[1]
        if len(parts) > 2:
            kw["flavour"] = parts[2]
        if len(parts) > 3:
            raise EditError(f"mode {mode!r}: at most selective@K:rank:flavour")
        return "selective", kw
    if mode not in MODES or mode == "selective@K":
        raise EditError(f"unknown mode {mode!r}; modes: {', '.join(MODES)} (selective as e.g. 'selective@8')")
    return mode, kw


def apply_mode(state, name: str, value: str, mode: str, **kw):
    base, kw = parse_mode(mode, kw)
    t0 = time.perf_counter()
    fn = {"stale": stale, "in_place": in_place, "erratum": erratum, "field+erratum": field_erratum,
          "hoist": hoist, "selective": selective, "full": full, "auto": auto}[base]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("state", "name", "value") and not p.startswith("_")]
    bad = [k for k in kw if k not in allowed]
    if bad:
        raise EditError(f"mode {mode!r} takes no option(s) {bad}; its options: {allowed or 'none'}")
    out = fn(state, name, value, **kw)
    out.cost.wall_s = time.perf_counter() - t0 + out.cost.reused_wall_s
    return out


def _values(d: dict, name: str, value: str) -> dict:
    return {**d, name: value}


# ---------------------------------------------------------------------- basic modes
def stale(state, name, value):
    return state._next(EditCost("stale"), values=_values(state.values, name, value), mode="stale")


def in_place(state, name, value, _mode="in_place"):
    ctx, model = state.ctx, state.model
    cost = EditCost(_mode)
    doc_values = _values(state.doc_values, name, value)
    layout = ctx.render(doc_values)
    if layout.ids == state.layout.ids:
        return state._next(cost, values=_values(state.values, name, value), doc_values=doc_values,
                           layout=layout, mode=_mode)
    check_aligned(state.layout, layout, name)
    cache, clean = state.cache, state.clean
    for occ in layout.slots[name]:
        a, b = occ[0], occ[-1]
        cache = ops.refresh_slots(model, cache, a, [layout.ids[s] for s in occ])
        cost.add(f"field {name!r} slots {a}-{b}", len(occ), model)
        if clean >= a:
            clean = b + 1
    return state._next(cost, values=_values(state.values, name, value), doc_values=doc_values, layout=layout,
                       cache=cache, clean=clean, mode=_mode)


def _append(state, kind, name, value, template, cost):
    ctx = state.ctx
    tpl = check_line_template("template", template) if template is not None else (
        ctx.erratum if kind == "erratum" else ctx.hoist)
    text = tpl.format(field=name, value=value, old=state.doc_values[name]) + ctx.separator
    cache, n = ops.append(state.model, state.cache, text, kind)
    cost.add(f"{kind} line", n, state.model)
    return cache, state.appended + ((kind, text, n),)


def erratum(state, name, value, template=None):
    cost = EditCost("erratum")
    cache, appended = _append(state, "erratum", name, value, template, cost)
    return state._next(cost, values=_values(state.values, name, value), cache=cache, appended=appended,
                       mode="erratum")


def field_erratum(state, name, value, template=None):
    st = in_place(state, name, value, _mode="field+erratum")
    cost = st.cost
    cache, appended = _append(st, "erratum", name, value, template, cost)
    return st._next(cost, cache=cache, appended=appended, mode="field+erratum")


def hoist(state, name, value, template=None):
    cost = EditCost("hoist")
    cache, appended = _append(state, "hoist", name, value, template, cost)
    return state._next(cost, values=_values(state.values, name, value), cache=cache, appended=appended,
                       mode="hoist")


def full(state, name, value):
    """Recompute from the first slot that differs from the new document or is not exact."""
    ctx, model = state.ctx, state.model
    values = _values(state.values, name, value)
    layout = ctx.render(values)
    old = state.layout.ids
    c = next((i for i, (a, b) in enumerate(zip(old, layout.ids)) if a != b), min(len(old), len(layout)))
    c = min(c, state.clean)
    cache = ops.recompute_from(model, state.cache, c, layout.ids, layout.segment_labels())
    cost = EditCost("full", needs_full=True)
    cost.add(f"recompute slots {c}-{len(layout) - 1}", len(layout) - c, model)
    return state._next(cost, values=values, doc_values=dict(values), layout=layout, cache=cache, appended=(),
                       clean=len(layout), mode="full")


# ---------------------------------------------------------------------- selective
def selective(state, name, value, k: int = 8, rank: str = "attention", flavour: str = "faithful", seed: int = 0,
              probe_layer: int = 1, cue: str | None = None, ranking: dict | None = None):
    """``in_place`` plus ``k`` downstream slots (everything after the field's last token,
    appended lines included), ranked and then recomputed (faithful) or copied (oracle).
    ``ranking``: the ``selection`` of an earlier selective state of the same edit and rank,
    reused instead of ranking again (its cost and wall time are still charged to this edit)."""
    if rank not in RANKS:
        raise EditError(f"selective rank {rank!r}; choose one of {RANKS}")
    if flavour not in FLAVOURS:
        raise EditError(f"selective flavour {flavour!r}; choose one of {FLAVOURS}")
    if k < 0:
        raise EditError(f"selective@{k}: K must be >= 0")
    label = f"selective@{k}:{rank}:{flavour}"
    st = in_place(state, name, value, _mode=label)
    model, cost = st.model, st.cost
    end = max(max(occ) for occ in st.layout.slots[name])
    candidates = list(range(end + 1, len(st.cache)))
    k_eff = min(k, len(candidates))
    if k_eff < k:
        cost.detail.append(f"only {len(candidates)} downstream slot(s): K clamped to {k_eff}")
    if k_eff == 0:
        return st._next(cost, mode=label)
    before = (cost.tokens, cost.token_forwards, cost.flops, len(cost.detail), time.perf_counter())
    if ranking is not None:
        if ranking["rank"] != rank:
            raise EditError(f"ranking= holds a {ranking['rank']!r} ranking, this edit ranks by {rank!r}")
        order = [s for s in ranking["order"] if s in set(candidates)]
        cost.merge(ranking["rank_cost"], prefix="reused ")
        cost.reused_wall_s += ranking["rank_cost"].wall_s
    elif rank == "attention":
        cue = st.ctx.cue if cue is None else cue
        if cue is None:
            raise EditError("selective with rank='attention' needs a cue (edit(..., cue=...) or EditableContext(cue=...))")
        order = ops.rank_by_attention(model, st.cache, candidates, cue)
        cost.add("rank: cue forward with attention patterns", len(model.encode(cue, start=len(st.cache))[0][0]), model)
    elif rank == "deviation":
        order = ops.rank_by_deviation(model, st.cache, candidates, probe_layer=probe_layer)
        cost.add("rank: K/V deviation probe", len(candidates), model, layers=probe_layer + 1)
    else:
        order = ops.rank_random(candidates, seed)
    rank_cost = EditCost(f"rank:{rank}", cost.tokens - before[0], cost.token_forwards - before[1],
                         cost.flops - before[2], time.perf_counter() - before[4] + (cost.reused_wall_s if ranking else 0),
                         detail=cost.detail[before[3]:])
    chosen = sorted(order[:k_eff])
    n_doc = len(st.layout)
    if flavour == "faithful":
        cache = ops.recompute_selected(model, st.cache, chosen)
        cost.add(f"recompute {k_eff} selected slot(s) against the partly stale cache", k_eff, model)
        clean = n_doc if st.clean > end and set(range(end + 1, n_doc)) <= set(chosen) else st.clean
    else:
        ref = st.ctx.reference(st.doc_values)
        fields = [s for occ in st.layout.slots[name] for s in occ]
        doc_chosen = [s for s in chosen if s < n_doc]
        cache = st.cache.patch(ref.cache, fields + doc_chosen)
        first = min(fields)
        cost.add("oracle: full recompute from the field (needed to copy from)", n_doc - first, model)
        cost.needs_full = True
        cost.detail.append(f"upper bound: K/V of {len(doc_chosen)} slot(s) copied from the full recompute")
        clean = st.clean
    cost.detail.append(f"selected slots {chosen}")
    out = st._next(cost, cache=cache, clean=clean, mode=label)
    return replace(out, selection={"rank": rank, "flavour": flavour, "order": list(order), "chosen": chosen,
                                   "rank_cost": rank_cost})


# ---------------------------------------------------------------------- auto
@dataclass
class AutoReport:
    """Why ``auto`` chose its mode. ``decisions``: mode -> (choice, margin) it looked at."""

    chosen: str
    reason: str
    prefilter: str | None = None
    escalated: bool = False
    decisions: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "reason": self.reason, "prefilter": self.prefilter,
                "escalated": self.escalated, "decisions": self.decisions}


def auto(state, name, value, cue=None, choices=None, escalate: str = "full", fallback: str = "full"):
    """Choose a mode for this edit.

    1. No change -> ``stale``. 2. A value with another token count -> ``fallback`` (in place
    is impossible). 3. Pre-filters (cheap: the in-place refresh and two cue forwards): no slot
    after the field -> ``in_place`` (exact); the in-place refresh alone changes the decision
    -> ``in_place``. 4. Diagnostic: decide on ``field+erratum`` as well; if it agrees with
    ``in_place`` -> ``in_place``, else the cheap edit is insufficient -> ``escalate``.
    """
    if escalate not in ("full", "field+erratum"):
        raise EditError(f"auto escalate={escalate!r}; choose 'full' or 'field+erratum'")
    cue, choices = state.ctx._defaults(cue, choices)
    cost = EditCost("auto")

    def done(st, chosen, reason, charge=True, **kw):
        rep = AutoReport(chosen, reason, **kw)
        if charge:
            cost.merge(st.cost, prefix=f"{chosen}: ")
        cost.detail.append(f"auto -> {chosen}: {reason}")
        return replace(st, cost=cost, history=state.history + (cost,), mode="auto", auto=rep)

    def dec(st, label, report):
        d = st.decide(cue, choices, both=False)
        cost.add(f"diagnostic decode ({label})", decision_tokens(st.model, cue, choices, d.space, len(st.cache)), st.model)
        report[label] = {"choice": d.choice, "margin": round(d.margin, 4)}
        return d

    if value == state.values[name] and name not in state.stale_fields:
        return done(state.edit(name, value, "stale"), "stale", "the value did not change")
    layout = state.ctx.render(_values(state.doc_values, name, value))
    try:
        check_aligned(state.layout, layout, name)
    except EditError as err:
        st = state.edit(name, value, fallback)
        return done(st, fallback, f"in_place impossible ({err}); fell back to {fallback}", escalated=True)
    ip = in_place(state, name, value)
    cost.merge(ip.cost, prefix="diagnostic ")
    end = max(max(occ) for occ in ip.layout.slots[name])
    if end + 1 >= len(ip.cache):
        return done(ip, "in_place", "no slot after the field: in_place is exact", charge=False,
                    prefilter="field is last")
    seen: dict = {}
    d_stale, d_ip = dec(state, "stale", seen), dec(ip, "in_place", seen)
    if d_ip.choice != d_stale.choice:
        return done(ip, "in_place",
                    f"pre-filter: the in-place refresh alone moved the decision ({d_stale.choice} -> {d_ip.choice})",
                    charge=False, prefilter="in_place moved the decision", decisions=seen)
    fe = field_erratum(ip, name, value)
    cost.merge(fe.cost, prefix="diagnostic ")
    d_fe = dec(fe, "field+erratum", seen)
    if d_fe.choice == d_ip.choice:
        return done(ip, "in_place", f"in_place and field+erratum agree ({d_ip.choice})", charge=False,
                    decisions=seen)
    reason = (f"in_place says {d_ip.choice}, field+erratum says {d_fe.choice}: the cheap edit is insufficient; "
              f"escalated to {escalate}")
    if escalate == "field+erratum":
        return done(fe, "field+erratum", reason, charge=False, escalated=True, decisions=seen)
    return done(state.edit(name, value, "full"), "full", reason, escalated=True, decisions=seen)
