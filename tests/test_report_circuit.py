"""The report's circuit section: the notes graph of the report's own pairs, ranked on its
selection half and scored on its evaluation half, cells matched by role, stored with n and
intervals, and a page whose sentences are the stored numbers."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest

from circuits import graph_stage, report_page, roles, scenarios
from circuits.pairstate import prefill_pair
from circuits.report import CircuitReport
from conftest import tiny_model
from notekv.graph import dispersion as disp
from test_report_page import NAMES_TOML


def _swing_floor_off(mp):
    import circuits.report as report

    mp.setattr(report, "MIN_SWING", 0.0)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """A report on the random tiny model with names of different token lengths (the value sits
    at a different distance from the decision from pair to pair), the swing floor lifted so
    that every stage runs: this checks the machinery, not a finding."""
    tmp = tmp_path_factory.mktemp("circuit")
    path = tmp / "names.toml"
    path.write_text(NAMES_TOML)
    with pytest.MonkeyPatch.context() as mp:
        _swing_floor_off(mp)
        rep = CircuitReport.build(tiny_model("llama"), str(path), pairs=14, screen="swing", act_pairs=2,
                                  heatmap_pairs=1, seed=2, progress=False)
    out = rep.save(tmp / "out")
    return rep.data, (out / "index.html").read_text(), path


def test_the_circuit_stage_runs_on_the_reports_pairs_with_real_intervals(names):
    d, _, _ = names
    c = d["circuit"]
    assert "circuit" in d["stages_done"] and "circuit" in d["timings"]
    # every usable pair enters once; the split is the report's (by prompt: held out)
    assert c["n_pairs"] == d["n_used"] and c["n_left_out"] == 0
    assert (c["n_selection"], c["n_evaluation"]) == (d["n_selection"], d["n_evaluation"]) and c["held_out"]
    assert c["keys"] == "role" and c["method"] == "ig" and c["steps"] == graph_stage.STEPS
    # agreement: every pair checked, n = distinct pairs, a real interval
    ag = c["agreement"]
    assert ag["n_pairs"] == d["n_used"] and ag["ig"]["spearman"]["n"] == d["n_used"]
    assert c["n_edges"]["min"] > graph_stage.CHECK and ag["n_edges_per_pair"] == [graph_stage.CHECK] * d["n_used"]
    rho = ag["ig"]["spearman"]
    assert rho["ci"][0] <= rho["mean"] <= rho["ci"][1] and rho["ci"][0] < rho["ci"][1]
    assert rho["mean"] > 0.8  # IG on a tiny model agrees with exact path patching (test_graph.py measures it too)
    # faithfulness and dispersion on the evaluation half only
    f = c["faithfulness"]
    assert f["n"] == d["n_evaluation"] and f["full_graph"]["n"] == d["n_evaluation"] and f["held_out"]
    assert f["n_selection"] == d["n_selection"] and f["n_ranked"] == c["n_ranked"] and f["sizes"][-1] == c["n_ranked"]
    assert all(len(f[k]) == len(f["sizes"]) for k in ("top", "random", "complement"))
    assert {m["threshold"] for m in f["minimal"]} == {0.8, 0.9}
    assert c["dispersion"]["n"] == d["n_evaluation"]
    # the drawn edges are the strongest ranked ones, largest magnitude first
    w = [abs(e["weight"]) for e in c["edges"]]
    assert len(w) == min(graph_stage.FIGURE_EDGES, c["n_ranked"]) and w == sorted(w, reverse=True)
    json.dumps(c)  # stored as plain JSON


def test_the_verdict_and_the_finding_are_the_stored_numbers(names):
    d, _, _ = names
    c = d["circuit"]
    dp = c["dispersion"]
    shows, sentence = disp.verdict(dp, d["model"])
    assert (shows, sentence) == (dp["shows"], dp["verdict"])
    lo, hi = dp["evenness_write_minus_read"]["ci"]
    assert dp["shows"] is (lo > 0)  # n >= 2: a verdict, from the interval of the paired difference
    diff = dp["evenness_write_minus_read"]
    assert f"paired difference {diff['mean']:.2f} [{lo:.2f}, {hi:.2f}], n={diff['n']} distinct pairs" in sentence
    g = c["faithfulness"]["full_graph"]
    assert f"carries {g['mean']:.2f} [{g['ci'][0]:.2f}, {g['ci'][1]:.2f}] of the swing (n={g['n']} " in c["finding"]
    assert graph_stage.finding(c) == c["finding"]


def test_cells_are_matched_by_role_across_pairs_of_different_lengths(tmp_path, monkeypatch):
    """Names of 2 and 10 characters put the same note at different distances from the
    decision; keyed by role, a kept token role names the same token in every pair."""
    _swing_floor_off(monkeypatch)
    path = tmp_path / "names.toml"
    path.write_text(NAMES_TOML)
    model = tiny_model("llama")
    sc = scenarios.get(path)
    states = [prefill_pair(model, p) for p in sc.pairs(model, 4, seed=0)]
    assert len({s.n_ctx - min(s.pair.diff_slots) for s in states}) > 1  # different token positions
    rm = roles.Roles(states)
    g = graph_stage.graph_of(model, states[:2], states[2:], rm, check=8, steps=2, progress=False)
    assert (g.selection, g.evaluation) == ([0, 1], [2, 3]) and g.held_out
    checked = 0
    for p in g.pairs:
        assert len(p.keys) == p.n_slots - p.first
        for c, k in enumerate(p.keys):
            tok = roles.token_of(k)
            if tok is not None:
                assert p.tokens[p.first + c] == tok, (k, p.tokens[p.first + c])
                checked += 1
    common = set.intersection(*(set(p.keys) for p in g.pairs))
    assert "value+0" in common and "'.'#1" in common and checked >= 4 * 3
    # the '.' after the value is one node in the ranking, whatever its distance from the decision
    ranked = {k for k, _ in g.ranking()}
    assert ("fc", 0, "'.'#1") in ranked


def test_the_page_shows_the_section_with_its_numbers(names):
    d, page, _ = names
    c = d["circuit"]
    figs = report_page.figures_of(d)
    assert set(graph_stage.FIGURES) <= set(figs)
    assert "<h2>The notes circuit as a graph</h2>" in page
    assert html.escape(c["finding"]) in page and html.escape(c["dispersion"]["verdict"]) in page
    for m in c["faithfulness"]["minimal"]:
        assert html.escape(graph_stage.minimal_text(m, "")) in page
    rho = c["agreement"]["ig"]["spearman"]
    assert f"{rho['mean']:.3f} [{rho['ci'][0]:.3f}, {rho['ci'][1]:.3f}]" in page
    # the faithfulness figure: top-k, random, complement and the whole graph, over the sizes
    curve = figs["circuit_faithfulness"][0]
    names_ = [t.name for t in curve.data if t.showlegend is not False]
    assert names_ == ["top-k edges (ranked on selection pairs)", "k random edges", "every edge but the top k",
                      "every edge (the whole graph)"]
    top = next(t for t in curve.data if t.name == names_[0] and t.mode == "lines+markers")
    assert list(top.x) == c["faithfulness"]["sizes"]
    assert list(top.y) == pytest.approx([s["mean"] for s in c["faithfulness"]["top"]])
    # the graph: one line per drawn edge, labelled by token and role
    graph = figs["circuit_graph"][0]
    assert sum(1 for t in graph.data if t.mode == "lines") == len(c["edges"])
    # the summary table row says the same as the verdict
    word = {True: "shows", False: "does not show", None: "too few pairs to tell"}[c["dispersion"]["shows"]]
    assert f"): {word}</td>" in page


def test_too_few_pairs_in_a_half_is_said_not_run(tmp_path, monkeypatch):
    import circuits.report as report

    _swing_floor_off(monkeypatch)
    path = tmp_path / "names.toml"
    path.write_text(NAMES_TOML)
    model = tiny_model("llama")
    sc = scenarios.get(path)
    states = [prefill_pair(model, p) for p in sc.pairs(model, 3, seed=0)]
    b = report._screen(model, sc, states, 0, "swing", act_pairs=1, heatmap_pairs=1, head_candidates=1,
                       progress=False, ranking="exact", attribution_pairs=1)
    assert len(b.sel) < report.MIN_HALF
    report._stage_circuit(b)
    assert "circuit" not in b.d
    why = b.d["too_few_pairs"]["circuit"]
    assert why.startswith(f"too few pairs (n={len(b.sel)} selection pairs")
    assert html.escape(why) in graph_stage.section(b.d, {})


def test_minimal_sizes_not_reached_are_said_so():
    nan = math.nan
    m = {"threshold": 0.8, "edges": nan, "ci": [nan, nan], "reached_share": 0.0, "n": 6}
    assert graph_stage.minimal_text(m) == "not reached at any size of the swing (n=6; reached in 0% of resamples)"
    s = {"mean": 0.28, "ci": [0.2, 0.35], "n": 6}
    c = {"faithfulness": {"full_graph": s, "auc_top_minus_random": {"mean": 0.1, "ci": [0.05, 0.2], "n": 6},
                          "minimal": [m, {**m, "threshold": 0.9}]}}
    text = graph_stage.finding(c)
    assert "carries 0.28 [0.20, 0.35] of the swing (n=6" in text and "no circuit reaches 80% of the swing" in text
    assert "recover more than random circuits" in text
    reached = {**m, "edges": 64.0, "ci": [32.0, 128.0], "reached_share": 0.9}
    c["faithfulness"]["minimal"] = [reached]
    assert "the smallest circuit reaching 80% of the swing has 64 edges [32, 128] (n=6)" in graph_stage.finding(c)
