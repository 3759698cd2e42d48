"""The report's circuit section: the notes circuit of the report's pairs as a graph.

:func:`measure` runs :func:`notekv.circuit` on the report's usable pairs (field -> note cells
(layer, slot) -> read heads (layer, query head) at the decision -> logit difference) and
keeps, in ``report.json`` under ``circuit``:

* the split: the report's own selection and evaluation halves (split by prompt, so no prompt
  sits in both), not the graph's default split; edges are ranked on the selection pairs and
  every circuit is scored, and the dispersion measured, on the evaluation pairs;
* ``agreement``: each edge estimate (EAP, EAP with the key fix, EAP-IG) against exact direct
  path patching of ``check`` edges per pair (half the IG estimate's largest, half at random),
  on every pair: Spearman and top-8 overlap with bootstrap intervals over distinct pairs;
* ``faithfulness``: top-k circuits of the ranked edges, their complements and random circuits
  of the same sizes, the whole graph's own share of the swing, and the smallest circuits
  reaching 80% / 90% of the swing (or "not reached");
* ``dispersion``: write evenness over the note cells, read evenness over the heads, their
  paired difference and the verdict on "distributed write, concentrated read", a sentence
  computed from those numbers (:func:`notekv.graph.dispersion.verdict`);
* ``edges``: the strongest ranked edges with the labels to draw them.

Cells of different pairs are matched by their slot's *role* (:mod:`circuits.roles`), the key
the rest of the report pools by: the scenario's names, ids and values vary in token length,
so "the k-th slot before the decision" (the graph's default key) is a different token from
pair to pair, while ``'.'#1`` (the last '.' before the decision) is the same note in each.
"""

from __future__ import annotations

import html
import statistics

import notekv as nk
from notekv.graph.edges import METHODS
from notekv.graph.figure import layered

from . import figures
from .pairstate import PairState
from .roles import Roles

STEPS = 8  # points of the OLD -> NEW path EAP-IG averages over
CHECK = 32  # edges per pair checked by exact path patching
N_RANDOM = 5  # random circuits of each size
FIGURE_EDGES = 40  # ranked edges drawn
TOP_EDGES_LISTED = 10
THRESHOLD = 0.8  # the minimal circuit the summary names (faithfulness also gives 0.9)
FIGURES = ("circuit_graph", "circuit_faithfulness")


def cell_keys(roles: Roles, st: PairState) -> list[str]:
    """One key per graph cell of the pair (slots from the first differing token to the last
    before the decision): the slot's role; a slot without one (none in the built-in
    scenarios) by its distance from the decision."""
    of = roles.of(st)
    return [of.get(q, f"-{st.n_ctx - q}") for q in range(min(st.pair.diff_slots), st.n_ctx)]


def graph_of(model, sel: list[PairState], ev: list[PairState], roles: Roles, *, seed: int = 0, progress: bool = True,
             steps: int = STEPS, check: int = CHECK) -> nk.CircuitGraph:
    """:func:`notekv.circuit` of the pairs ``sel`` + ``ev`` (already screened by the report:
    the graph's own swing floor is off, so every pair enters), cells keyed by role
    (:func:`cell_keys`), split into the report's selection (``sel``) and evaluation (``ev``)
    halves instead of the graph's own split."""
    states = list(sel) + list(ev)
    g = nk.circuit(model, [list(s.pair.old_ids) for s in states], [list(s.pair.new_ids) for s in states],
                   answers=[(s.pair.good, s.pair.bad) for s in states], steps=steps, check=check, seed=seed,
                   min_swing=0.0, keys=[cell_keys(roles, s) for s in states], progress=progress)
    where = {(p.old_ids, p.new_ids): i for i, p in enumerate(g.pairs)}

    def idx(half):
        return sorted(where[k] for k in ((tuple(s.pair.old_ids), tuple(s.pair.new_ids)) for s in half) if k in where)
    g.selection, g.evaluation = idx(sel), idx(ev)
    g.meta["split"] = "the report's selection and evaluation pairs"
    g.meta["keys"] = "role"
    return g


def measure(model, sel: list[PairState], ev: list[PairState], roles: Roles, *, seed: int = 0, progress: bool = True,
            steps: int = STEPS, check: int = CHECK, n_random: int = N_RANDOM) -> dict | None:
    """The circuit section's numbers (see the module docstring) of the graph of
    :func:`graph_of`; None when a half lost every pair (a swing of exactly 0 leaves a pair
    out of the graph)."""
    g = graph_of(model, sel, ev, roles, seed=seed, progress=progress, steps=steps, check=check)
    if not g.selection or not g.evaluation:
        return None
    return summarize(g, n_random=n_random, seed=seed, progress=progress)


def summarize(g: nk.CircuitGraph, *, n_random: int = N_RANDOM, seed: int = 0, progress: bool = True) -> dict:
    """What ``report.json`` keeps of a graph (its faithfulness computed here)."""
    faith = g.faithfulness(n_random=n_random, seed=seed, progress=progress)
    ranked = g.ranking()
    ref = g.pairs[g.selection[0]]
    n_edges = sorted(p.index.n for p in g.pairs)
    out = {
        "method": g.method, "steps": g.meta["steps"], "check": g.meta["check"], "n_random": n_random,
        "keys": g.meta.get("keys", "place"), "n_pairs": len(g.pairs), "n_selection": len(g.selection),
        "n_evaluation": len(g.evaluation), "held_out": g.held_out, "n_left_out": g.meta["n_given"] - len(g.pairs),
        "n_edges": {"min": n_edges[0], "median": statistics.median(n_edges), "max": n_edges[-1]},
        "n_ranked": len(ranked),
        "agreement": g.agreement(),
        "faithfulness": faith,
        "dispersion": g.dispersion(),
        "edges": [{"edge": list(k), "weight": w} for k, w in ranked[:FIGURE_EDGES]],
        "labels": {"field": "field " + " ".join(repr(ref.tokens[q]) for q in ref.field),
                   "slot_order": {k: c for c, k in enumerate(ref.keys)},
                   "slot_token": {k: ref.tokens[ref.first + c] for c, k in enumerate(ref.keys)},
                   "logit": "logit[good] - logit[bad]"},
    }
    out["finding"] = finding(out)
    return out


# ---------------------------------------------------------------------- words from numbers
def _f(s: dict | None, digits: int = 2) -> str:
    if not s or s.get("mean") is None or s["mean"] != s["mean"]:
        return "n/a"
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def minimal_text(m: dict, of: str = "of the swing") -> str:
    """``"k edges [lo, hi]"`` or ``"not reached"`` for one minimal-circuit entry."""
    of = f" {of}" if of else ""
    if m["edges"] != m["edges"]:  # nan: no size reaches it on the mean over pairs
        return (f"not reached at any size{of} (n={m['n']}; reached in {m['reached_share']:.0%} of resamples)"
                if m["reached_share"] == m["reached_share"] else f"not reached{of} (n={m['n']})")
    lo, hi = m["ci"]
    return f"{m['edges']:.0f} edges [{lo:.0f}, {hi:.0f}]{of} (n={m['n']})"


def finding(c: dict) -> str:
    """The faithfulness finding in words, from the stored numbers."""
    f = c["faithfulness"]
    g, d = f["full_graph"], f["auc_top_minus_random"]
    m = next(x for x in f["minimal"] if x["threshold"] == THRESHOLD)
    lo, hi = d["ci"]
    beats = ("the ranked circuits recover more than random circuits of the same sizes" if lo > 0 else
             "the ranked circuits recover less than random ones" if hi < 0 else
             "the ranked circuits are not distinguishable from random ones at this n")
    if m["edges"] == m["edges"]:
        small = f"the smallest circuit reaching {THRESHOLD:.0%} of the swing has {minimal_text(m, '')}"
    else:
        small = (f"no circuit reaches {THRESHOLD:.0%} of the swing at any size (n={m['n']}; reached in "
                 f"{m['reached_share']:.0%} of resamples)")
    mg = next((x for x in f.get("minimal_of_graph", []) if x["threshold"] == THRESHOLD), None)
    if mg is not None:
        small += (f"; of the graph's own share, {minimal_text(mg, '')} reach {THRESHOLD:.0%}" if mg["edges"] == mg["edges"]
                  else f"; no circuit reaches {THRESHOLD:.0%} of the graph's own share either")
    return (f"With every edge at NEW the graph carries {_f(g)} of the swing (n={g['n']} evaluation pairs; heads at "
            f"the decision never see each other's changes); {small}; {beats} (area under the curve, top minus "
            f"random {_f(d, 3)}).")


# ---------------------------------------------------------------------- the page
def figures_of(d: dict) -> dict:
    """``{name: (figure, caption)}`` of the circuit section (empty when it did not run)."""
    c = d.get("circuit")
    if not c:
        return {}
    f = c["faithfulness"]
    n_sel, n_ev = c["n_selection"], c["n_evaluation"]
    title = (f"notes graph of {d['model']}: top {len(c['edges'])} edges ranked by {c['method']} on {n_sel} selection "
             "pairs")
    graph = layered([(tuple(e["edge"]), e["weight"]) for e in c["edges"]], c["labels"], title=title)
    x = f["sizes"]
    series = {"top-k edges (ranked on selection pairs)": (x, f["top"]), "k random edges": (x, f["random"]),
              "every edge but the top k": (x, f["complement"]),
              "every edge (the whole graph)": (x, [f["full_graph"]] * len(x))}
    curve = figures.curves(series, f"Faithfulness of ranked circuits (evaluation pairs, n={f['n']})",
                           "circuit size k (edges, log scale)", yaxis="share of the swing (mean, 95% CI)")
    curve.update_xaxes(type="log")
    curve.add_hline(y=THRESHOLD, line_dash="dot", line_color="#888")
    return {
        "circuit_graph": (graph, (
            f"Field -> note cells (layer, slot) -> read heads (layer, head) at the decision -> logit difference: the "
            f"{len(c['edges'])} strongest edges by {c['method']} attribution, mean over {n_sel} selection pairs in units "
            f"of each pair's swing (width: weight; blue toward NEW, red toward OLD). Cells are matched across pairs by "
            f"role; a cell's label is its token in the first selection pair.")),
        "circuit_faithfulness": (curve, (
            f"The top k edges at NEW and every other edge at OLD (top-k), the reverse (complement) and {c['n_random']} "
            f"random circuits of k edges per size, on {n_ev} evaluation pairs; ranked once on {n_sel} other pairs. "
            f"The dotted line is {THRESHOLD:.0%} of the swing. Mean and 95% bootstrap interval over distinct pairs.")),
    }


def _row(*cells) -> str:
    return "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>"


def section(d: dict, figs: dict) -> str:
    """The circuit section of the page: the graph, its agreement with exact path patching,
    the faithfulness curve and minimal circuits, the dispersion and its verdict."""
    c = d.get("circuit")
    if not c:
        why = (d.get("too_few_pairs") or {}).get("circuit")
        return f"<h2>The notes circuit as a graph</h2><p>{html.escape(why)}</p>" if why else ""
    ag, f, dp = c["agreement"], c["faithfulness"], c["dispersion"]
    fig_html = {k: f"<figure>{fig.to_html(full_html=False, include_plotlyjs=False)}<figcaption>"
                   f"{html.escape(cap)}</figcaption></figure>" for k, (fig, cap) in figs.items()}
    names = {"plain": "EAP (gradient x change)", "fixed": "EAP with the key fix", "ig": f"EAP-IG ({c['steps']} steps)"}
    agree = "".join(_row(names[m] + (" - ranks the edges" if m == c["method"] else ""),
                         _f((ag.get(m) or {}).get("spearman"), 3), _f((ag.get(m) or {}).get("top8_overlap")),
                         (ag.get(m) or {}).get("spearman", {}).get("n", 0)) for m in METHODS)
    minimal = "".join(_row(f"{m['threshold']:.0%} of the swing", minimal_text(m, ""),
                           minimal_text(mg, "")) for m, mg in zip(f["minimal"], f.get("minimal_of_graph", f["minimal"])))
    w, r, diff = dp["write"], dp["read"], dp["evenness_write_minus_read"]
    disp = "".join(_row(*x) for x in (
        ("write: evenness over the note cells (layer, slot after the field)", _f(w["evenness"]),
         f"{w['n_nodes']['mean']:.0f} cells; effective number {_f(w['effective'], 1)}"),
        ("read: evenness over the heads at the decision", _f(r["evenness"]),
         f"{r['n_nodes']['mean']:.0f} heads; effective number {_f(r['effective'], 1)}; top 5% hold {_f(r['top_share'])}"),
        ("write minus read evenness (paired)", _f(diff), f"n={diff['n']} evaluation pairs"),
        ("write mass on delimiter tokens / their share of the note slots",
         f"{_f(w['delimiter_mass_share'])} / {_f(w['delimiter_slot_share'])}", f"n={w['delimiter_mass_share']['n']}"),
        ("write mass on the field's own cells", _f(w["field_own_share"]), f"n={w['field_own_share']['n']}")))
    top = "".join(_row(_edge_name(e["edge"], c["labels"]), f"{e['weight']:+.3f}") for e in c["edges"][:TOP_EDGES_LISTED])
    n_e = c["n_edges"]
    edges = str(n_e["min"]) if n_e["min"] == n_e["max"] else f"{n_e['min']}-{n_e['max']} (median {n_e['median']:g})"
    return (
        "<h2>The notes circuit as a graph</h2>"
        f"<p>Nodes: the field, every note cell (layer, slot from the field to the decision), every query head at the "
        f"decision, the logit difference; {edges} edges per pair. Edges are scored by attribution "
        f"({c['method']} ranks them) and ranked on {c['n_selection']} selection pairs; circuits are scored exactly on "
        f"{c['n_evaluation']} evaluation pairs ({'no pair in both' if c['held_out'] else 'the same pairs: not held out'}"
        f"). Cells are matched across pairs by role (see The notes).</p>"
        f"{fig_html.get('circuit_graph', '')}"
        f"<table><tr><th>strongest edges (selection pairs)</th><th>share of the swing</th></tr>{top}</table>"
        f"<h3>Attribution against exact path patching</h3><p>{c['check']} edges per pair patched exactly (half the "
        f"largest estimates, half at random), on all {ag['n_pairs']} pairs; mean and 95% bootstrap interval over "
        "distinct pairs.</p><table><tr><th>estimate</th><th>Spearman with exact</th><th>top-8 overlap</th>"
        f"<th>n pairs</th></tr>{agree}</table>"
        f"<h3>Faithfulness</h3><p>{html.escape(c['finding'])}</p>{fig_html.get('circuit_faithfulness', '')}"
        "<table><tr><th>smallest circuit reaching</th><th>of the swing</th><th>of the whole graph's own share</th></tr>"
        f"{minimal}</table>"
        "<h3>Distributed write, concentrated read?</h3><p>Write: how evenly the field -> note edges' mass spreads over "
        "the note cells; read: how evenly the head -> logit edges' mass spreads over the heads (evenness = entropy / "
        "log of the number of nodes: 0 one node, 1 all equal); on evaluation pairs.</p>"
        f"<table><tr><th>measure</th><th>mean, 95% CI</th><th></th></tr>{disp}</table>"
        f"<p><b>{html.escape(dp['verdict'])}.</b></p>")


def _edge_name(key: list, labels: dict) -> str:
    tok = labels.get("slot_token", {})

    def cell(l, k):
        return f"L{l} {tok[k]!r} ({k})" if k in tok else f"L{l} ({k})"
    if key[0] == "fc":
        return f"field -> {cell(key[1], key[2])}"
    if key[0] == "ch":
        return f"{cell(key[1], key[2])} -> L{key[1]}.H{key[3]}"
    return f"L{key[1]}.H{key[2]} -> logit"


__all__ = ["CHECK", "FIGURES", "FIGURE_EDGES", "N_RANDOM", "STEPS", "cell_keys", "figures_of", "finding",
           "graph_of", "measure", "minimal_text", "section", "summarize"]
