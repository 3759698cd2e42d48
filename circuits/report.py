"""``CircuitReport``: the battery on one model and scenario -> ``report.json`` + ``index.html``.

Pairs are screened (does the decision flip with the field?), split at random into selection
and evaluation halves; rankings (note positions, read heads, the conclusion direction) are
fit on selection pairs and every ranked quantity is reported on evaluation pairs. Rates
carry Wilson intervals, means a 10^4-resample bootstrap interval, and every number its n.
Slots of different pairs are pooled by role (:mod:`circuits.roles`), not by their distance
from the decision. With ``out``, each finished stage is written to ``report.json`` as it
completes (``"complete": false`` and ``"stages_done"`` until the last).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import notekv as nk
from notekv.runner import progress_bar
from notekv.errors import check_int
from notekv.stats import rate, summary

from notekv.attribution import agreement

from . import attribution, discover, graph_stage, report_page, roles, scenarios, sweeps
from .pairstate import PairState, prefill_pair

PAPER = {  # the paper's figures (4-32B models), for the side-by-side table
    "field_only": "0.009 (Qwen3-8B), -0.028 (Llama-3.1-8B), <=0.025 others; Mistral-7B 0.137, Gemma-2-27B 0.22",
    "downstream": "1.0 by construction",
    "top_k": "top-8 single positions ~0.75",
    "random_k": "8 random positions ~0.01",
    "downstream_slots": "hundreds of slots from the field to the decision, so 8 positions are a few percent of them",
    "attention_mass": "field ~0.001, downstream ~0.5, sinks ~0.4",
    "read_heads": "a dozen heads jointly ~0.78",
    "write.attn_share": "attention 0.4-0.9 of the residual delta at the aggregator tokens",
    "delimiters": "notes on delimiters, the decision cue and template tails",
    "direction": "difference-of-means direction ~0.22 vs 0.01 random",
    "knockout": "top-25% downstream keys knocked out in the field-only cache: 12/12 flip",
    "circuit": "distributed write (top-24 writer heads saturate at 0.08-0.28), concentrated read (a dozen heads ~0.78)",
}
CITATION = ("Models Take Notes at Prefill: KV Cache Can Be Editable and Composable, arXiv 2606.17107 (2026)")
TOP_KS = (1, 2, 4, 8)
JOINT_KS = (1, 4, 8, 12)
MIN_SWING = 0.5  # |s_new - s_old| below this (logits) leaves a pair out, as in the paper
MIN_USED_PAIRS = 4  # fewer usable pairs than this: nothing to locate
MIN_HALF = 2  # fewer pairs than this in the selection (evaluation) half: the parts that rank (report) on it say
#               "too few pairs" in the report instead of running
NOTES_SHOWN = 12  # ranked note positions listed in the report
TOP_K_REPORTED = 8  # the paper's "top-8 vs 8 random positions"
TOP_FRACTIONS = (0.05, 0.1, 0.25, 0.5)  # top-k and random-k also at k = ceil(f * slots from the field on)
FRACTION_REPORTED = 0.05  # the fraction set beside the paper's 8 of hundreds
WRITE_READ_HEADS = 4  # the write is measured into the layers of this many top read heads (ranked on selection)
DIRECTION_DEPTH = 2 / 3  # the conclusion direction is read at this fraction of the depth
RANDOM_DIRECTIONS = 10
SCREENS = ("flip", "swing")


@dataclass
class _Build:
    """What the stages of :meth:`CircuitReport.build` share: the model, the screened pairs
    split into selection and evaluation halves, and the report dictionary being filled."""

    model: nk.HookedModel
    seed: int
    act_pairs: int
    heatmap_pairs: int
    head_candidates: int
    progress: bool
    states: list[PairState]
    used: list[PairState]
    sel: list[PairState]
    ev: list[PairState]
    d: dict
    kv: dict = field(default_factory=dict)  # id(state) -> its KV battery
    ranked_roles: list[str] = field(default_factory=list)  # note roles, best first (ranked on selection pairs)
    read_heads: list = field(default_factory=list)  # (layer, head), best first (ranked on selection pairs)
    roles: roles.Roles | None = None  # the slots' roles over the usable pairs (set by _screen)
    ranking: str = "auto"  # asked for: "auto", "exact" or "attribution"
    attribution_pairs: int = 12
    method: str = "exact"  # what ranks notes and heads here ("attribution" on long prompts)
    attr: dict = field(default_factory=dict)  # id(state) -> its attribution record
    checks: list = field(default_factory=list)  # exact checks of the attribution maps
    verify_positions: dict = field(default_factory=dict)  # id(state) -> slots patched one at a time
    ranking_roles: list = field(default_factory=list)  # (role, selection mean, n) of the attribution ranking

    @property
    def rec(self) -> dict:
        return self.d.setdefault("recovery", {})

    def per_position(self, states: list[PairState]) -> list[dict]:
        return [self.kv[id(s)]["per_position"] for s in states]


@dataclass
class CircuitReport:
    data: dict
    figures: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, model: nk.HookedModel, scenario: str = "refund", *, pairs: int = 64, seed: int = 0,
              act_pairs: int = 8, heatmap_pairs: int = 3, head_candidates: int = 24, screen: str = "flip",
              context_tokens: int | None = None, ranking: str = "auto", attribution_pairs: int = 12,
              progress: bool = True, out: str | Path | None = None) -> "CircuitReport":
        """Screen ``pairs`` candidate pairs of ``scenario``, then run the stages (KV battery,
        notes and knockout, attention mass, activation patching, read heads, write and
        direction, the notes circuit as a graph), each timed in ``data["timings"]``.

        Pairs are deduplicated by token ids, and values that do not align on the model's
        tokenizer are skipped (counted, warned about). ``screen``: ``"flip"`` keeps pairs whose
        decision flips with the field (argmax, both sides) and whose swing is at least
        ``MIN_SWING``; ``"swing"`` keeps every pair the field moves by at least ``MIN_SWING``
        logits in the rule's direction, flipped or not (recovery needs a swing, not a flip).
        ``ranking``: what ranks note positions and read heads: ``"exact"`` (single-slot KV
        patching of every downstream slot, head DLA), ``"attribution"`` (KV attribution with
        the key fix, on long prompts; the ranked slots are then patched exactly) or ``"auto"``
        (attribution above ``attribution.ABOVE`` downstream slots). Either way the attribution
        map of ``attribution_pairs`` evaluation pairs is checked against exact patching.
        ``context_tokens``: lengthen every prompt with few-shot examples to at most that many
        tokens (``Scenario.fit``; refused above the model's context).
        ``out``: a directory where ``report.json`` is written after the screen and after each
        stage (``"complete": false``, ``"stages_done"``; on an exception or Ctrl-C the stage
        that failed under ``"failed_stage"``), so that an interrupted run keeps what it
        finished; :meth:`save` then writes the complete report and the page.
        """
        if screen not in SCREENS:
            raise nk.InputError(f"screen={screen!r}: choose one of {SCREENS}")
        if ranking not in attribution.RANKINGS:
            raise nk.InputError(f"ranking={ranking!r}: choose one of {attribution.RANKINGS}")
        check_int("attribution_pairs", attribution_pairs, low=1)
        check_int("pairs", pairs, low=1)
        check_int("seed", seed)
        check_int("act_pairs", act_pairs, low=1)
        check_int("heatmap_pairs", heatmap_pairs, low=1)
        check_int("head_candidates", head_candidates, low=1)
        t0 = time.time()
        sc = scenarios.get(scenario)
        sc.check_answers(model)  # before any forward: answers the decision cannot read are refused here
        sc, skipped = sc.usable(model)
        candidates = sc.pairs(model, pairs, seed=seed, context_tokens=context_tokens)
        distinct = list({(p.old_ids, p.new_ids): p for p in candidates}.values())
        states = [prefill_pair(model, p) for p in progress_bar(distinct, desc="prefill pairs", leave=False,
                                                               progress=progress)]
        b = _screen(model, sc, states, seed, screen, act_pairs=act_pairs, heatmap_pairs=heatmap_pairs,
                    head_candidates=head_candidates, progress=progress, ranking=ranking,
                    attribution_pairs=attribution_pairs)
        b.d.update({"n_candidates": len(candidates), "skipped_values": skipped, "context_tokens": context_tokens})
        cls._meta(model, b.d)
        b.d["alignment"] = _alignment(b.roles, b.used)
        timings = b.d["timings"] = {"prefill": round(time.time() - t0, 2)}
        done = b.d["stages_done"] = ["prefill"]
        if len(b.used) < max(1, MIN_USED_PAIRS):
            b.d["verdict"] = _verdict(b.d)
            b.d["seconds"] = time.time() - t0
            b.d["complete"] = True
            return cls(b.d)
        _checkpoint(b.d, out, t0)
        for name, fn in progress_bar(STAGES, desc=f"circuit report {model.name}/{sc.name}", progress=progress):
            mark = time.time()
            try:
                globals()[fn](b)
            except BaseException as err:  # Ctrl-C included: keep what the finished stages measured
                b.d["failed_stage"] = name
                b.d["error"] = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
                _checkpoint(b.d, out, t0)
                raise
            timings[name] = round(time.time() - mark, 2)
            done.append(name)
            _checkpoint(b.d, out, t0)
        b.d["verdict"] = _verdict(b.d)
        b.d["seconds"] = time.time() - t0
        b.d["complete"] = True
        return cls(b.d)

    @staticmethod
    def _meta(model, d: dict) -> None:
        d.update({"made_by": "notekv report", "notekv_version": nk.__version__, "fingerprint": dict(model.fingerprint),
                  "citation": CITATION, "dtype": model.dtype_name, "provenance": provenance(model)})

    # ------------------------------------------------------------------ output
    def figure(self, name: str):
        """One plotly figure of the report (``report_page.FIGURES`` lists them)."""
        if not self.figures:
            self.figures = report_page.figures_of(self.data)
        if name not in self.figures:
            raise nk.InputError(f"no figure {name!r} in this report; have {sorted(self.figures)}")
        return self.figures[name][0]

    def save(self, out: str | Path) -> Path:
        """Write ``report.json`` and a standalone ``index.html`` (plotly embedded, offline)."""
        out = Path(out)
        if not self.figures:
            self.figures = report_page.figures_of(self.data)
        page = report_page.html_page(self.data, self.figures)
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write(out / "report.json", json.dumps(self.data, indent=1, default=float))
            _write(out / "index.html", page)
        except OSError as err:
            raise nk.InputError(f"out={str(out)!r}: cannot write the report there ({err.strerror or err}); pass a "
                                "directory you can write") from None
        return out


def _write(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _checkpoint(d: dict, out: str | Path | None, t0: float) -> None:
    """The report so far into ``out/report.json`` (``"complete": false``); a page of an
    earlier run there is removed, since it would no longer match."""
    if out is None:
        return
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        page = out / "index.html"
        if page.is_file():
            page.unlink()
        _write(out / "report.json", json.dumps({**d, "complete": False, "seconds": time.time() - t0}, indent=1,
                                               default=float))
    except OSError as err:
        raise nk.InputError(f"out={str(out)!r}: cannot write the report there ({err.strerror or err}); pass a "
                            "directory you can write") from None


def provenance(model) -> dict:
    """Where the weights came from: ``model.provenance`` as a record (``summary`` the one-line
    label), or, without one, what the bundled model list says of ``model.name``."""
    prov = getattr(model, "provenance", None)
    if prov is not None and hasattr(prov, "to_dict"):
        return prov.to_dict()
    if isinstance(prov, dict):
        return {"summary": str(prov.get("summary", prov)), **prov}
    if prov:
        return {"summary": str(prov)}
    from notekv.model.load import bundled_models

    for m in bundled_models():
        if m["name"] == model.name and "GGUF" in m["description"]:
            return {"source": model.name, "format": "gguf", "dequantized_to": "float32",
                    "summary": f"{m['description']} checkpoint (quantized weights) dequantized to float32; not the "
                               "original full-precision weights"}
    return {"source": model.name, "summary": f"{model.name}: origin not recorded"}


def _alignment(rm: roles.Roles, states: list[PairState]) -> dict:
    """How slots of different pairs are matched: by role, and how many layouts (token
    sequences from the field to the decision) the pairs have."""
    lay = rm.layouts(states)
    return {"by": "role", "n_pairs": len(states), "n_layouts": len(lay),
            "largest_layout": max(lay.values()) if lay else 0, "kept_token_roles": len(rm.common),
            "rule": "the field's slots by their place relative to the value; a slot after the field by its token and "
                    "its occurrence counted back from the decision when every usable pair has that; text that varies "
                    "between pairs (a name, an id) by its place after the last such slot"}


def _screen(model, sc, states: list[PairState], seed: int, screen: str = "flip", **opts) -> _Build:
    """Which distinct pairs the field moves (and flips); the usable ones split at random into
    selection and evaluation halves by distinct prompt, so that no prompt sits in both."""
    flipping = [s for s in states if s.flips]
    moved = [s for s in states if s.swing * s.pair.expect_new >= MIN_SWING]
    used = [s for s in flipping if abs(s.swing) >= MIN_SWING] if screen == "flip" else moved
    sel, ev = split_by_prompt(used, seed)
    d: dict = {
        "model": model.name, "scenario": sc.name, "kind": sc.kind, "seed": seed, "screen": screen,
        "n_pairs": len(states), "n_flipping": len(flipping), "n_moved": len(moved), "n_used": len(used),
        "n_selection": len(sel), "n_evaluation": len(ev),
        "flip_rate": rate(len(flipping), len(states)),
        "non_flip_rate": rate(len(states) - len(flipping), len(states)),
        "moved_rate": rate(len(moved), len(states)),
        "swing": summary([s.swing * s.pair.expect_new for s in states]),
        "paper": PAPER,
    }
    return _Build(model=model, seed=seed, states=states, used=used, sel=sel, ev=ev, d=d, roles=roles.Roles(used),
                  **opts)


def split_by_prompt(states: list[PairState], seed: int) -> tuple[list[PairState], list[PairState]]:
    """Selection and evaluation halves such that pairs sharing a prompt (OLD or NEW token ids)
    land in the same half: groups of connected pairs are shuffled and each goes to the half
    with fewer pairs so far (the evaluation half first; :func:`notekv.graph.split_pairs`)."""
    from notekv.graph import split_pairs

    sel, ev = split_pairs([(s.pair.old_ids, s.pair.new_ids) for s in states], seed)
    return [states[i] for i in sel], [states[i] for i in ev]


def _too_few(b: _Build, part: str, *, selection: bool = False, evaluation: bool = False) -> bool:
    """Whether ``part`` lacks pairs in a half it needs (``selection``: it ranks on the
    selection half; ``evaluation``: it reports on the evaluation half); if so, the report says
    "too few pairs (n=...)" for it under ``too_few_pairs`` instead of running it."""
    halves = (("selection", b.sel, selection), ("evaluation", b.ev, evaluation))
    short = [f"n={len(half)} {name} pairs" for name, half, needed in halves if needed and len(half) < max(1, MIN_HALF)]
    if not short:
        return False
    b.d.setdefault("too_few_pairs", {})[part] = (f"too few pairs ({', '.join(short)}; at least {MIN_HALF} needed "
                                                 "in each half this part uses)")
    return True


def _stage_attribution(b: _Build) -> None:
    """KV attribution maps (one decode step and one backward pass per batch of pairs) and
    their exact check on each pair's top and random cells. On long prompts (or when asked)
    the maps also rank the note positions on selection pairs, and pick the slots the KV
    battery patches one at a time."""
    b.method = attribution.choose(b.ranking, b.used)
    checked = [] if _too_few(b, "attribution_checks", evaluation=True) else b.ev[: b.attribution_pairs]
    states = b.used if b.method == "attribution" else checked
    b.attr = attribution.attribute_states(b.model, states) if states else {}
    b.checks = [attribution.verify(b.model, s, b.attr[id(s)], seed=b.seed)
                for s in progress_bar(checked, desc="attribution checks", leave=False, progress=b.progress)]
    if b.method == "attribution":
        b.ranking_roles = b.roles.rank([b.attr[id(s)]["per_position"] for s in b.sel], b.sel)
        top = [r for r, _, _ in b.ranking_roles[:NOTES_SHOWN]]
        b.verify_positions = {id(s): attribution.positions_to_verify(s, b.attr[id(s)], b.roles.offsets(s, top),
                                                                     attribution.VERIFY, seed=b.seed) for s in b.used}
    scatter = [c for c in b.checks[: attribution.SCATTER_PAIRS]]
    b.d["attribution"] = {
        "method": b.method, "asked": b.ranking, "threshold_positions": attribution.ABOVE,
        "downstream_positions": max(len(s.field_onward) for s in b.used),
        "verified_cells_per_pair": 2 * attribution.VERIFY,
        "scatter": {"estimate": [x for c in scatter for x in c["estimate"]],
                    "plain": [x for c in scatter for x in c["plain"]],
                    "exact": [x for c in scatter for x in c["exact"]], "n_pairs": len(scatter)},
        "heatmap": attribution.heatmap(checked, b.attr, b.roles) if checked else None,
    }


def _attribution_agreement(b: _Build) -> None:
    """Agreement of the maps with exact patching: the verified (layer, slot) cells, and the
    single-slot recoveries of the KV battery (every downstream slot, or the verified ones)."""
    if "attribution" not in b.d or not b.checks:
        return
    positions = []
    for s in b.ev[: b.attribution_pairs]:
        exact = b.kv[id(s)]["per_position"]
        est = b.attr[id(s)]["per_position"]
        slots = sorted(exact)
        positions.append(agreement([est[q] for q in slots], [exact[q] for q in slots]))
    b.d["attribution"]["agreement"] = attribution.summary_of(b.checks, positions, b.seed)


def _stage_kv(b: _Build) -> None:
    """The KV battery on every usable pair: regions, per layer, suffix/prefix fractions."""
    kv = [sweeps.kv_battery(b.model, s, positions=b.verify_positions.get(id(s)))
          for s in progress_bar(b.used, desc="KV patching", leave=False, progress=b.progress)]
    b.kv = {id(s): k for s, k in zip(b.used, kv)}
    _attribution_agreement(b)
    rec = b.rec
    for name in ("stale", "field_only", "downstream", "after_field"):
        rec[name] = summary([k[name] for k in kv], seed=b.seed)
    rec["per_layer"] = [summary([k["per_layer"][l] for k in kv]) for l in range(b.model.spec.n_layers)]
    for part in ("suffix_fraction", "prefix_fraction"):
        rec[part] = [summary([k[part][i] for k in kv]) for i in range(len(sweeps.FRACTIONS))]
    rec["fractions"] = list(sweeps.FRACTIONS)
    n_slots = sorted(len(s.field_onward) for s in b.used)  # slots from the field to the decision, per pair
    rec["n_slots"] = {"min": n_slots[0], "median": statistics.median(n_slots), "max": n_slots[-1], "n": len(n_slots)}
    b.d["sanity"] = {"max_abs_downstream_minus_1": max(abs(k["downstream"] - 1) for k in kv),
                     "max_abs_stale": max(abs(k["stale"]) for k in kv)}


def _stage_notes(b: _Build) -> None:
    """Note roles ranked on selection pairs and evaluated on the others; top-k vs random, at
    fixed k and at fractions of the slots; the delimiter split; graded knockout of the ranked
    notes in the field-only cache."""
    if _too_few(b, "notes_knockout", selection=True, evaluation=True):
        return
    ranking = b.ranking_roles if b.method == "attribution" else b.roles.rank(b.per_position(b.sel), b.sel)
    b.ranked_roles = [r for r, _, _ in ranking]
    b.d["notes_ranked_by"] = b.method
    ev_values = b.roles.values(b.per_position(b.ev), b.ev)
    rep = b.ev[0]
    rep_slot = {r: q for q, r in b.roles.of(rep).items()}
    b.d["notes"] = [{"role": r, "where": roles.describe(r), "token": b.roles.tokens(r, b.ev + b.sel)[0],
                     "tokens": b.roles.tokens(r, b.ev + b.sel),
                     "region": roles.region(r), "position": rep_slot.get(r),
                     "offset": rep.n_ctx - rep_slot[r] if r in rep_slot else None,
                     "recovery_selection": mean, "n_selection": n,
                     "recovery": summary(ev_values[r])["mean"] if r in ev_values else None,
                     "evaluation": summary(ev_values.get(r, []), seed=b.seed)}
                    for r, mean, n in ranking[:NOTES_SHOWN]]
    b.d["notes_pooled"] = {"n_selection": len(b.sel), "n_evaluation": len(b.ev), "roles": len(ranking),
                           "roles_in_every_selection_pair": sum(n == len(b.sel) for _, _, n in ranking)}
    pp = b.kv[id(rep)]["per_position"]
    b.d["example"] = {"tokens": list(rep.pair.tokens), "regions": list(rep.pair.regions),
                      "recovery": [pp.get(i) for i in range(len(rep.pair.tokens))],
                      "old_value": rep.pair.old_value, "new_value": rep.pair.new_value,
                      "value_slots": list(rep.pair.diff_slots)}
    b.d["delimiter_share"] = discover.delimiter_share(b.per_position(b.ev), b.ev)
    b.d["delimiters"] = _delimiters(discover.delimiter_split(b.per_position(b.ev), b.ev), b.seed)
    rec = b.rec
    rvr, fks = [], []
    for s in b.ev:
        n = len(s.field_onward)
        ks = {f: max(1, math.ceil(f * n)) for f in TOP_FRACTIONS}
        fks.append(ks)
        rvr.append(sweeps.ranked_vs_random(b.model, s, b.roles.offsets(s, b.ranked_roles),
                                           sorted(set(TOP_KS) | set(ks.values())), seed=b.seed))
    rec["top_k"] = [{"k": k, **summary([r["top"][k] for r in rvr])} for k in TOP_KS]
    rec["random_k"] = [{"k": k, **summary([r["random"][k] for r in rvr])} for k in TOP_KS]
    rec["top_k_at"] = next(r for r in rec["top_k"] if r["k"] == TOP_K_REPORTED)
    rec["random_k_at"] = next(r for r in rec["random_k"] if r["k"] == TOP_K_REPORTED)
    n_ev_slots = [len(s.field_onward) for s in b.ev]
    rec["k_as_fraction"] = [{"k": k, **summary([min(k, n) / n for n in n_ev_slots])} for k in TOP_KS]
    for kind in ("top", "random"):
        rec[f"{kind}_fraction"] = [{"fraction": f, "k": summary([ks[f] for ks in fks]),
                                    **summary([r[kind][ks[f]] for r, ks in zip(rvr, fks)])} for f in TOP_FRACTIONS]
    rec["top_fraction_at"] = next(r for r in rec["top_fraction"] if r["fraction"] == FRACTION_REPORTED)
    rec["random_fraction_at"] = next(r for r in rec["random_fraction"] if r["fraction"] == FRACTION_REPORTED)
    ko = [sweeps.graded_knockout(b.model, s, b.roles.offsets(s, b.ranked_roles)) for s in b.ev]
    b.d["knockout"] = [{"fraction": f, "recovery": summary([k[f]["recovery"] for k in ko]),
                        "flip": rate(sum(k[f]["flipped"] for k in ko), len(ko))} for f in ko[0]]


def _delimiters(split: list[dict], seed: int) -> dict:
    """The delimiter split over pairs: the share of positive note recovery on delimiter tokens
    against their share of the slots (paired per pair), and mean recovery on each kind."""
    excess = [x["mass_share"] - x["slot_share"] for x in split]
    out = {k: summary([x[k] for x in split], seed=seed)
           for k in ("mass_share", "slot_share", "delimiter_mean", "other_mean")}
    out["excess"] = summary(excess, seed=seed)
    out["n_pairs"] = len(split)
    out["n_delimiter_slots"] = sum(x["n_delimiter"] for x in split)
    out["n_other_slots"] = sum(x["n_other"] for x in split)
    lo, hi = out["excess"]["ci"]
    if not out["excess"]["n"]:
        out["shows"], out["finding"] = None, "no positive note recovery after the field to split"
    elif lo > 0:
        out["shows"] = True
        out["finding"] = "yes: delimiter tokens carry more of the note recovery than their share of the slots"
    elif hi < 0:
        out["shows"] = False
        out["finding"] = "no: delimiter tokens carry less of the note recovery than their share of the slots"
    else:
        out["shows"] = False
        out["finding"] = ("not shown: the delimiters' share of the note recovery is not distinguishable from their "
                          "share of the slots at this n")
    return out


def _stage_attention(b: _Build) -> None:
    """The OLD decision query's attention mass by region, on every usable pair."""
    am = [sweeps.attention_mass(b.model, s) for s in b.used]
    regions = sorted({r for a in am for r in a["mean"]})
    b.d["attention_mass"] = {r: summary([a["mean"].get(r, 0.0) for a in am]) for r in regions}
    b.d["attention_mass"]["sinks"] = b.d["attention_mass"].get("sink")


def _stage_activations(b: _Build) -> None:
    """Per-layer activation patching of the tail, and the resid_pre layer x position heatmap."""
    if _too_few(b, "activation_patching", evaluation=True):
        return
    L = b.model.spec.n_layers
    ev = b.ev[: b.act_pairs]
    exact_maps = b.method == "exact"  # long prompts: the grids come from attribution
    act = [sweeps.activation_patching(b.model, s, heatmap_site="resid_pre" if exact_maps and i < b.heatmap_pairs else None)
           for i, s in enumerate(progress_bar(ev, desc="activation patching", leave=False, progress=b.progress))]
    if not exact_maps:
        for a, s in zip(act, ev[: b.heatmap_pairs]):
            p = s.pair
            att = nk.attribute_acts(b.model, list(p.old_ids), list(p.new_ids), answers=(p.good, p.bad),
                                    sites=("resid_pre",))
            a["heatmap"] = (att.estimate("resid_pre")[:, a["tail_slots"]] / s.swing).tolist()
    b.d["activation_patching"] = {
        f"per_layer_{site}": [summary([a[f"per_layer_{site}"][l] for a in act]) for l in range(L)]
        for site in ("resid_pre", "attn_out", "mlp_out")}
    b.d["activation_patching"]["n"] = len(act)
    heat = [(a, s) for a, s in zip(act, ev) if "heatmap" in a]
    b.d["heatmap"] = {"site": "resid_pre", "method": "exact" if exact_maps else "attribution",
                      **b.roles.pool([s for _, s in heat], [a["heatmap"] for a, _ in heat],
                                   [a["tail_slots"] for a, _ in heat], decision=True)}
    kv_heatmap = _kv_heatmap(b, ev[: b.heatmap_pairs]) if exact_maps else b.d["attribution"]["heatmap"]
    if kv_heatmap is not None:
        b.d["kv_heatmap"] = kv_heatmap


def _kv_heatmap(b: _Build, states: list[PairState]) -> dict:
    """The paper's main figure: KV-patching recovery of each (layer, slot) from the field to
    the decision, one cell at a time; the columns are the first pair's slots, each the mean
    over the pairs that have its role (:meth:`circuits.roles.Roles.pool`)."""
    grids, slots = [], []
    for st in states:
        p = st.pair
        sw = nk.patch_sweep(b.model, list(p.old_ids), list(p.new_ids), answers=(p.good, p.bad), site="kv",
                            slots=st.field_onward, block=48, progress=False)
        grids.append(sw.recovery.tolist())
        slots.append(st.field_onward)
    return {**b.roles.pool(states, grids, slots), "method": "exact"}


def _stage_read_heads(b: _Build) -> None:
    """Head DLA ranked on selection pairs; per-head and joint top-k patching on evaluation pairs."""
    if _too_few(b, "read_heads", selection=True, evaluation=True):
        return
    model, L = b.model, b.model.spec.n_layers
    dla_sel = torch.stack([discover.head_dla(model, s) for s in b.sel]).mean(0)  # [L, H]
    rank_by = dla_sel
    if b.method == "attribution":  # the estimated recovery of patching each head's decision output
        rank_by = torch.stack([b.attr[id(s)]["heads"] for s in b.sel]).mean(0)
    b.d["read_heads_ranked_by"] = "dla" if b.method == "exact" else "attribution"
    flat = sorted(((float(rank_by[l, h]), l, h) for l in range(L) for h in range(model.spec.n_heads)), reverse=True)
    candidates = [(l, h) for _, l, h in flat[: b.head_candidates]]
    b.read_heads = candidates
    hp = [discover.head_patch(model, s, candidates, JOINT_KS) for s in b.ev]
    b.d["read_heads"] = [{"layer": l, "head": h, "dla_selection": float(dla_sel[l, h]),
                          **{k: v for k, v in summary([p["single"][i] for p in hp]).items() if k in ("mean", "ci")},
                          "recovery": summary([p["single"][i] for p in hp])["mean"]}
                         for i, (l, h) in enumerate(candidates)]
    b.d["read_heads_joint"] = [{"k": k, **summary([p["joint"][k] for p in hp])} for k in JOINT_KS]
    b.d["head_dla_grid"] = dla_sel.tolist()


def _stage_write_direction(b: _Build) -> None:
    """Who writes the notes where they are read (attention vs MLP below each read head's
    layer) and the conclusion direction."""
    if not _too_few(b, "write", evaluation=True):
        wd = [discover.write_decomposition(b.model, s) for s in b.ev[: b.act_pairs]]
        b.d["write"] = _write_at(b, wd)
    top = next((r for r in b.ranked_roles if roles.region(r) == "downstream"), None)
    if not _too_few(b, "direction", selection=True, evaluation=True) and top is not None:
        b.d["direction"] = _direction(b, b.sel, b.ev[: b.act_pairs], top)


def _write_at(b: _Build, wd: list[dict]) -> dict:
    """The write decomposition into the read layers (those of the top ``WRITE_READ_HEADS``
    read heads ranked on selection pairs; every layer when the read heads did not run) and
    into every layer, with intervals over the evaluation pairs."""
    L = b.model.spec.n_layers
    heads = b.read_heads[:WRITE_READ_HEADS]
    layers = sorted({l for l, _ in heads if l > 0})
    chosen = "the layers of the top read heads, ranked on selection pairs"
    if not layers:
        layers = list(range(1, L))
        chosen = ("every layer: the read heads did not run (too few pairs)" if not heads
                  else "every layer: the top read heads sit in layer 0, where no layer writes below")

    def share(w, part, ls):  # per pair: the part's share of the delta entering ls, averaged over ls
        vals = [sum(w[part][l]) for l in ls if w[part][l][0] == w[part][l][0]]
        return sum(vals) / len(vals) if vals else float("nan")

    per_layer = [{"layer": l, "heads": [h for hl, h in heads if hl == l],
                  "attn_share": summary([share(w, "attn", [l]) for w in wd], seed=b.seed),
                  "mlp_share": summary([share(w, "mlp", [l]) for w in wd], seed=b.seed)} for l in layers]
    return {
        "site": "resid_pre", "positions": "the slots after the field",
        "read_layers": layers, "read_heads": [list(h) for h in heads], "layers_chosen": chosen,
        "attn_share": summary([share(w, "attn", layers) for w in wd], seed=b.seed),
        "mlp_share": summary([share(w, "mlp", layers) for w in wd], seed=b.seed),
        "per_read_layer": per_layer,
        # the source layers' shares, averaged over the read layers (a layer at or above a read layer adds 0 to it)
        "attn_by_source": [summary([sum(w["attn"][l][j] for l in layers) / len(layers) for w in wd], seed=b.seed)
                           for j in range(L)],
        "mlp_by_source": [summary([sum(w["mlp"][l][j] for l in layers) / len(layers) for w in wd], seed=b.seed)
                          for j in range(L)],
        "attn_share_by_layer": [summary([share(w, "attn", [l]) for w in wd], seed=b.seed) for l in range(L)],
        "closure": max(w["closure"] for w in wd), "n": len(wd)}


def _direction(b: _Build, sel: list[PairState], ev: list[PairState], role: str) -> dict:
    """Difference-of-means direction at the top note after the field (its role, in every pair
    that has it), 2/3 of the depth; patch its component."""
    model, seed = b.model, b.seed
    layer = round(DIRECTION_DEPTH * model.spec.n_layers)
    sel = [s for s in sel if b.roles.offsets(s, [role])]
    ev = [s for s in ev if b.roles.offsets(s, [role])]
    diffs = []
    for s in sel:
        x_old, x_new = discover.residual_at(model, s, layer, b.roles.offsets(s, [role])[0])
        diffs.append((x_new - x_old) * s.pair.expect_new)
    d = torch.stack(diffs).float().mean(0)  # fp32 whatever the model's dtype: a mean of small differences
    d = d / d.norm()
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same random directions on every device
    rand = torch.randn(RANDOM_DIRECTIONS, d.numel(), generator=g).to(d.device)
    rand = rand / rand.norm(dim=1, keepdim=True)
    dirs = torch.cat([d[None], rand])
    res = [discover.direction_patch(model, s, layer, b.roles.offsets(s, [role])[0], dirs) for s in ev]
    return {"layer": layer, "role": role, "where": roles.describe(role), "token": b.roles.tokens(role, sel)[0],
            "recovery": summary([r[0] for r in res]),
            "random": summary([sum(r[1:]) / RANDOM_DIRECTIONS for r in res]), "n": len(res), "n_selection": len(sel)}


def _stage_circuit(b: _Build) -> None:
    """The notes circuit as a graph (:mod:`circuits.graph_stage`): edges ranked on selection
    pairs, circuits and the write/read dispersion scored on evaluation pairs, attribution
    checked against exact path patching on every usable pair."""
    if _too_few(b, "circuit", selection=True, evaluation=True):
        return
    c = graph_stage.measure(b.model, b.sel, b.ev, b.roles, seed=b.seed, progress=b.progress)
    if c is None:
        b.d.setdefault("too_few_pairs", {})["circuit"] = ("too few pairs (a half has no pair whose swing the graph "
                                                          "can divide by)")
    else:
        b.d["circuit"] = c


def _verdict(d: dict) -> str:
    """Two separate findings, then the locating one: does the field move the decision (the
    rule-signed swing and its interval), does the decision flip (argmax), and, on the usable
    pairs, how much of the swing the field's own K/V carries."""
    sw = d["swing"]
    moves = (f"the field moves the decision by {sw['mean']:+.2f} [{sw['ci'][0]:+.2f}, {sw['ci'][1]:+.2f}] logits in the "
             f"rule's direction (n={sw['n']} distinct pairs)")
    if sw["n"] and sw["ci"][0] <= 0 <= sw["ci"][1]:
        moves = (f"the field does not move the decision distinguishably from 0: {sw['mean']:+.2f} "
                 f"[{sw['ci'][0]:+.2f}, {sw['ci'][1]:+.2f}] logits (n={sw['n']} distinct pairs)")
    flips = f"the decision flips on {d['n_flipping']}/{d['n_pairs']} pairs"
    head = f"On {d['model']}, {moves}; {flips}"
    if d["n_used"] < MIN_USED_PAIRS:
        need = "flip with a swing" if d.get("screen", "flip") == "flip" else "move"
        hint = (" (screen='swing' uses the pairs the field moves without a flip)"
                if d.get("screen", "flip") == "flip" and d.get("n_moved", 0) >= MIN_USED_PAIRS else "")
        return (f"{head}. Too few usable pairs to locate the notes (n={d['n_used']} that {need} of >= {MIN_SWING} "
                f"logits; at least {MIN_USED_PAIRS} needed){hint}.")
    fo, down = d["recovery"]["field_only"], d["recovery"]["downstream"]
    lo, hi = fo["ci"]
    few = d.get("too_few_pairs") or {}
    skipped = (f" Not run, too few pairs (n={d['n_selection']} selection, n={d['n_evaluation']} evaluation; at least "
               f"{MIN_HALF} needed in each half a part uses): {', '.join(p.replace('_', ' ') for p in few)}."
               if few else "")
    if hi < 0.1:
        note = "the field's own K/V drives almost none of the decision, as the paper reports at 4-32B"
    elif lo > 0.1:
        note = ("the field's own K/V drives a clear part of the decision here, unlike the ~0 the paper reports "
                "at 4-32B: at this scale the decision still reads the field directly")
    else:
        note = "the field-only share is not distinguishable from the paper's ~0 at this n"
    delim = ""
    dl = d.get("delimiters")
    if dl and dl["excess"]["n"]:
        m, sl = dl["mass_share"], dl["slot_share"]
        delim = (f" Notes on delimiter tokens: {dl['finding'].split(':')[0]} ({m['mean']:.2f} [{m['ci'][0]:.2f}, "
                 f"{m['ci'][1]:.2f}] of the positive note recovery after the field sits on delimiters, which are "
                 f"{sl['mean']:.2f} of those slots; n={dl['excess']['n']} evaluation pairs).")
    return (f"{head}. On {d['n_used']} usable pairs, refreshing only the field's K/V recovers {fo['mean']:.2f} "
            f"[{lo:.2f}, {hi:.2f}] of the decision swing, all downstream {down['mean']:.2f}: {note}.{delim}{skipped}")


# the stages in order: (name in timings and stages_done, function name); looked up when run
STAGES = (("attribution", "_stage_attribution"), ("kv_patching", "_stage_kv"), ("notes_knockout", "_stage_notes"),
          ("attention_mass", "_stage_attention"), ("activation_patching", "_stage_activations"),
          ("read_heads", "_stage_read_heads"), ("write_direction", "_stage_write_direction"),
          ("circuit", "_stage_circuit"))
