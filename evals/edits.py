"""Evaluate every edit mode on the built-in edit suite: ``edits.json`` + a standalone ``index.html``.

Per case (see :mod:`evals.edit_cases`): prefill the document once with the OLD value,
then build one state per mode and per control and score the answer words after the cue.

Decisions. ``s`` = log p(positive answer) - log p(negative answer) after the cue (leading
space). At 135M the raw argmax of ``s`` is set mostly by the few-shot example order, so even
the full recompute is near chance on the rule; the field moves ``s`` by a smaller amount.
The primary decision is therefore *calibrated on the model's own full recomputes*: a state
decides "positive" when its ``s`` is closer to the full recompute with the positive value
than to the one with the negative value (for an OLD -> NEW case these are the stale and
full states; equivalently recovery > 0.5). By construction stale scores 0 and full 1 on the
main modes. Cases whose full recomputes do not order the two values by the rule with a
swing of at least ``min_swing`` are screened out (counted in the report). The raw argmax is
reported beside it.

Controls (expected answer: OLD's label): an erratum stating a wrong value (one with OLD's
label), an erratum about the irrelevant ``agent`` field, and edits of that field (in place,
field+erratum). ``P(positive)`` per control, split by the expected label, exposes a bias of
errata toward one answer whatever they say.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from notekv.edit import EditableContext, EditError
from notekv.errors import InputError, NotFoundError, check_int
from notekv.edit.score import decide as score_cache
from notekv.kv import KVCache

from . import edit_cases
from notekv.stats import rate, summary

MODES = ["stale", "in_place", "erratum", "field+erratum", "hoist",
         "selective@{k}:attention:faithful", "selective@{k}:deviation:faithful", "selective@{k}:random:faithful",
         "selective@{k}:attention:oracle", "selective@{k}:deviation:oracle", "selective@{k}:random:oracle",
         "full", "auto"]
CONTROLS = {  # name -> (field kind, value kind, mode)
    "control:erratum_wrong_value": ("gate", "wrong", "erratum"),
    "control:erratum_irrelevant_field": ("irrelevant", "agent_new", "erratum"),
    "control:edit_irrelevant_in_place": ("irrelevant", "agent_new", "in_place"),
    "control:edit_irrelevant_field+erratum": ("irrelevant", "agent_new", "field+erratum"),
}


def _closer_to_positive(s: float, s_pos: float, s_neg: float) -> bool:
    return abs(s - s_pos) < abs(s - s_neg)


def run_case(model, case, modes, *, min_swing: float, noise: bool = False) -> dict:
    """Every mode and control on one case; ``{"valid": False, ...}`` if screened out."""
    t0 = time.perf_counter()
    ctx = EditableContext(model, case.template, case.fields, cue=case.cue, choices=case.choices).prefill()
    base = ctx.state
    d_old = base.decide(space=True, both=False)
    full = ctx.reference({**case.fields, case.field: case.new})  # the full recompute (memoized: oracles reuse it)
    d_new = full.decide(space=True, both=False)
    s_old, s_new = d_old.margin, d_new.margin
    s_pos, s_neg = (s_new, s_old) if case.new_positive else (s_old, s_new)
    rec = {"gate": case.gate, "index": case.index, "field": case.field, "old": case.old, "new": case.new,
           "new_positive": case.new_positive, "n_tokens": len(ctx.layout), "s_old": s_old, "s_new": s_new, "swing": s_pos - s_neg}
    rec["valid"] = rec["swing"] >= min_swing
    if not rec["valid"]:
        rec["wall_s"] = time.perf_counter() - t0
        return rec
    rec["space_agree"] = {"stale": base.decide(space=True).agree, "full": full.decide(space=True).agree}
    pos_word = case.choices[0]

    def score(st, expect_positive: bool, ref=d_new) -> dict:
        d = st.decide(space=True, both=False)
        s = d.margin
        cal_pos = _closer_to_positive(s, s_pos, s_neg)
        out = {"s": s, "choice": d.choice, "positive": cal_pos, "correct": cal_pos == expect_positive,
               "raw_positive": d.choice == pos_word, "raw_correct": (d.choice == pos_word) == expect_positive,
               "recovery": (s - s_old) / (s_new - s_old) if s_new != s_old else math.nan,
               "kl_full": d.kl_from(ref), "agree_full": d.choice == ref.choice,
               "cost": st.cost.to_json() if st.cost is not None else None}
        if st.auto is not None:
            out["auto"] = st.auto.to_json()
        return out

    rec["modes"] = {}
    rankings: dict = {}  # rank -> order: computed once per case, shared by faithful and oracle
    for mode in modes:
        kw = {}
        if mode.startswith("selective@"):
            rank = (mode.split(":") + ["attention"])[1]
            if rank in rankings:
                kw["ranking"] = rankings[rank]
        try:
            st = full if mode == "full" else base.edit(case.field, case.new, mode, **kw)
            if st.selection is not None:
                rankings.setdefault(st.selection["rank"], st.selection)
        except EditError as err:  # e.g. a value of another token count under in_place
            rec["modes"][mode] = {"error": str(err)}
            continue
        rec["modes"][mode] = score(st, case.new_positive)
    rec["controls"] = {}
    old_positive = case.is_positive(case.old)
    for name, (which, value_kind, mode) in CONTROLS.items():
        fld = case.field if which == "gate" else edit_cases.IRRELEVANT
        try:
            st = base.edit(fld, getattr(case, value_kind), mode)
        except EditError as err:
            rec["controls"][name] = {"error": str(err)}
            continue
        rec["controls"][name] = score(st, old_positive, ref=d_old)
        rec["controls"][name]["expect_positive"] = old_positive
    if noise:  # the model's own drift: a fresh prefill of the new document vs the suffix recompute
        fresh = KVCache.prefill(model, full.layout.view)
        d_fresh = score_cache(model, fresh, case.cue, case.choices, space=True, both=False)
        rec["noise_floor"] = {"kl": d_fresh.kl_from(d_new), "max_abs_dk": float((fresh.keys - full.cache.keys).abs().max()),
                              "max_abs_dv": float((fresh.values - full.cache.values).abs().max())}
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def check_gates(gates: list[str], suite: dict | None = None) -> None:
    """Refuse, before any model work, gates an evaluation cannot mean anything on: a gate
    ``suite`` (default :data:`evals.edit_cases.GATES`) lacks, two answers that are one word,
    or a value on both sides of the rule (its edits would change nothing)."""
    suite = edit_cases.GATES if suite is None else suite
    if isinstance(gates, str):
        raise InputError(f"gates={gates!r}: pass a list of gate names, e.g. [{gates!r}]")
    if not gates:
        raise InputError(f"gates: no gate to evaluate; pass some of {sorted(suite)}")
    for g in gates:
        if not isinstance(g, str) or g not in suite:
            raise NotFoundError(f"unknown gate {g!r}; gates: {sorted(suite)}")
        gate = suite[g]
        answers = [str(a).strip() for a in gate.get("answers", ())]
        if len(answers) != 2 or not all(answers) or answers[0] == answers[1]:
            raise InputError(f"gate {g!r}: answers {gate.get('answers')!r} must be two different non-empty words; "
                             "the decision compares the positive answer with the negative one")
        both = sorted(set(gate["positive"]) & set(gate["negative"]))
        if both:
            raise InputError(f"gate {g!r}: value(s) {both} are both positive and negative; an edit between them would "
                             "change nothing the rule reads. List each value on one side only")


def evaluate(model, gates: list[str] | None = None, n_cases: int = 32, *, k: int = 4, min_swing: float = 0.25,
             seed: int = 0, max_candidates: int | None = None, noise_cases: int = 2, modes: list[str] | None = None,
             progress: bool = True, scenario: str | None = None, suite: dict | None = None,
             agents: list[str] | None = None) -> dict:
    """Run the suite: ``n_cases`` valid cases spread over ``gates`` (default: every gate of
    ``suite``, the built-in :data:`evals.edit_cases.GATES` unless given). Cases are tried in
    order per gate until each gate's quota of valid cases is met or ``max_candidates``
    (default ``3 * n_cases``) cases were tried."""
    from notekv.runner import progress_bar

    if isinstance(gates, str):
        raise InputError(f"gates={gates!r}: pass a list of gate names, e.g. [{gates!r}]")
    gates = list(gates or (suite or edit_cases.GATES))
    check_gates(gates, suite)
    n_cases = check_int("n_cases", n_cases, low=1)
    k = check_int("k", k, low=0)
    seed = check_int("seed", seed)
    noise_cases = check_int("noise_cases", noise_cases, low=0)
    if max_candidates is not None:
        max_candidates = check_int("max_candidates", max_candidates, low=1)
    if isinstance(min_swing, bool) or not isinstance(min_swing, (int, float)) or not math.isfinite(min_swing):
        raise InputError(f"min_swing={min_swing!r}: pass a finite number of logits (e.g. 0.25)")
    modes = [m.format(k=k) for m in (modes or MODES)]
    from notekv.edit.modes import parse_mode

    for m in modes:  # an unknown mode would only show as an error in every case's record
        parse_mode(m, {})
    quota = {g: n_cases // len(gates) + (1 if i < n_cases % len(gates) else 0) for i, g in enumerate(gates)}
    limit = max_candidates if max_candidates is not None else 3 * n_cases
    t0 = time.perf_counter()
    records, tried = [], {g: 0 for g in gates}
    bar = progress_bar(total=n_cases, desc="edit cases", progress=progress)
    n_noise = 0
    while sum(tried.values()) < limit:
        open_gates = [g for g in gates if sum(r["valid"] for r in records if r["gate"] == g) < quota[g]]
        if not open_gates:
            break
        g = min(open_gates, key=lambda x: tried[x])
        case = edit_cases.make_case(g, tried[g], seed, gates=suite, agents=agents)
        tried[g] += 1
        rec = run_case(model, case, modes, min_swing=min_swing, noise=n_noise < noise_cases)
        n_noise += bool(rec.get("noise_floor"))
        records.append(rec)
        bar.update(int(rec["valid"]))
        bar.set_postfix(screened_out=sum(not r["valid"] for r in records))
    bar.close()
    out = summarize(records, modes)
    out.update({
        "format": "notekv.edits/1", "model": getattr(model, "name", "model"),
        "dtype": model.dtype_name, "scenario": scenario or ",".join(gates),
        "gates": gates, "settings": {"n_cases": n_cases, "k": k, "min_swing": min_swing, "seed": seed,
                                     "max_candidates": limit, "decision": "calibrated (see notes)"},
        "runtime_s": time.perf_counter() - t0, "notes": NOTES, "cases": records,
    })
    return out


NOTES = [
    "p_correct: calibrated decision — positive when the state's score s = logp(positive) - logp(negative) is closer "
    "to the model's full recompute with the positive value than with the negative one; stale = 0 and full = 1 by "
    "construction on the main modes. raw_p_correct: argmax of s (at 135M dominated by the example order).",
    "Intervals: Wilson 95% for rates, bootstrap 95% for means.",
    "Cost: tokens = positions recomputed; token_forwards = full-depth equivalents; flops = 2 * non-embedding params * "
    "token_forwards (attention scores ignored); wall_s = wall time of the edit on this machine.",
    "selective oracle copies K/V from a full recompute: an upper bound that needs the full recompute (its cost "
    "includes it). selective faithful recomputes the chosen slots against the partly stale cache.",
    "auto diagnostic: predicted 'in_place insufficient' = auto escalated; truth (raw) = the in_place argmax differs "
    "from the full recompute's; truth (calibrated) = in_place's calibrated decision is wrong.",
]


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


def _rate_of(rows, key, cond=lambda r: True) -> dict:
    sel = [r for r in rows if cond(r)]
    return rate(sum(bool(r[key]) for r in sel), len(sel))


def _mode_row(name: str, rows: list[dict], new_positive: list[bool], n_err: int) -> dict:
    pc = _rate_of(rows, "correct")
    raw = _rate_of(rows, "raw_correct")
    costs = [r["cost"] for r in rows if r.get("cost")]
    pairs = list(zip(rows, new_positive))
    pos_p = rate(sum(r["positive"] for r, p in pairs if p), sum(1 for _, p in pairs if p))
    pos_n = rate(sum(r["positive"] for r, p in pairs if not p), sum(1 for _, p in pairs if not p))
    return {
        "mode": name, "n": pc["n"], "k": pc["k"], "p_correct": pc["rate"], "ci": pc["ci"],
        "raw_p_correct": raw["rate"], "raw_ci": raw["ci"], "errors": n_err,
        "p_positive": _rate_of(rows, "positive")["rate"],
        "p_positive_when_expected_positive": pos_p, "p_positive_when_expected_negative": pos_n,
        "recovery": summary([r["recovery"] for r in rows]), "kl_full_mean": _mean([r["kl_full"] for r in rows]),
        "kl_full_median": sorted(r["kl_full"] for r in rows)[len(rows) // 2] if rows else math.nan,
        "agree_full": _rate_of(rows, "agree_full"),
        "tokens_recomputed": _mean([c["tokens"] for c in costs]), "token_forwards": _mean([c["token_forwards"] for c in costs]),
        "flops": _mean([c["flops"] for c in costs]), "wall_s": _mean([c["wall_s"] for c in costs]),
        "needs_full_recompute": any(c["needs_full"] for c in costs),
    }


def summarize(records: list[dict], modes: list[str]) -> dict:
    valid = [r for r in records if r["valid"]]
    out_modes = []
    for m in modes:
        rows = [(r["modes"][m], r["new_positive"]) for r in valid if "error" not in r["modes"].get(m, {"error": 1})]
        n_err = sum(1 for r in valid if "error" in r["modes"].get(m, {"error": 1}))
        out_modes.append(_mode_row(m, [x for x, _ in rows], [p for _, p in rows], n_err))
    controls = []
    for c in CONTROLS:
        rows = [r["controls"][c] for r in valid if "error" not in r["controls"].get(c, {"error": 1})]
        n_err = sum(1 for r in valid if "error" in r["controls"].get(c, {"error": 1}))
        controls.append(_mode_row(c, rows, [x["expect_positive"] for x in rows], n_err))
    noise = [r["noise_floor"] for r in records if r.get("noise_floor")]
    return {
        "n_valid": len(valid), "n_screened_out": len(records) - len(valid), "n_candidates": len(records),
        "screened_by_gate": {g: sum(1 for r in records if r["gate"] == g and not r["valid"]) for g in {r["gate"] for r in records}},
        "valid_by_gate": {g: sum(1 for r in valid if r["gate"] == g) for g in {r["gate"] for r in records}},
        "modes": out_modes, "controls": controls, "auto": _auto_stats(valid),
        "noise_floor": {"n": len(noise), "kl_max": max((x["kl"] for x in noise), default=math.nan),
                        "max_abs_dk": max((x["max_abs_dk"] for x in noise), default=math.nan)},
        "space_agreement": {k: _rate_of([{"a": r["space_agree"][k]} for r in valid], "a") for k in ("stale", "full")},
    }


def _auto_stats(valid: list[dict]) -> dict:
    rows = [(r["modes"]["auto"], r["modes"].get("in_place", {})) for r in valid
            if "auto" in r["modes"] and "error" not in r["modes"]["auto"] and "error" not in r["modes"].get("in_place", {"error": 1})]
    if not rows:
        return {"n": 0}
    pred = [a["auto"]["escalated"] for a, _ in rows]
    out = {"n": len(rows), "chosen": {}, "prefiltered": sum(a["auto"]["prefilter"] is not None for a, _ in rows)}
    for a, _ in rows:
        out["chosen"][a["auto"]["chosen"]] = out["chosen"].get(a["auto"]["chosen"], 0) + 1
    for name, truth in (("raw", [not ip["agree_full"] for _, ip in rows]), ("calibrated", [not ip["correct"] for _, ip in rows])):
        tp = sum(p and t for p, t in zip(pred, truth))
        out[name] = {"insufficient": sum(truth), "predicted": sum(pred), "tp": tp,
                     "precision": rate(tp, sum(pred)), "recall": rate(tp, sum(truth))}
    return out


def save(result: dict, out_dir: str | Path) -> Path:
    """Write ``edits.json`` and ``index.html`` into ``out_dir``; returns the directory."""
    from .edit_report import write_html

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "edits.json").write_text(json.dumps(_clean(result), indent=1, allow_nan=False))
        write_html(result, out / "index.html")
    except OSError as err:
        raise InputError(f"out_dir={str(out)!r}: cannot write the results there ({err.strerror or err}); pass a "
                         "directory you can write") from None
    return out


def _clean(o):
    """JSON-safe copy: NaN/inf -> None."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o
