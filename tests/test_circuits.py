"""circuits: scenarios, statistics, the KV-patching battery and the report."""

import json
import math

import pytest
import torch

from circuits import scenarios, sweeps
from conftest import TINY_TOML
from notekv import stats
from circuits.pairstate import prefill_pair
from circuits.report import CircuitReport
from circuits.scenarios import ScenarioError
from tests.conftest import tiny_model

# ---------------------------------------------------------------- statistics
def test_wilson_matches_known_values():
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert stats.wilson(0, 10)[0] == 0.0 and math.isnan(stats.wilson(0, 0)[0])


def test_bootstrap_is_random_and_covers_the_mean():
    x = torch.randn(30, generator=torch.Generator().manual_seed(0)).tolist()
    m, lo, hi = stats.bootstrap_mean(x, seed=0)
    assert lo < m < hi and m == pytest.approx(sum(x) / len(x))
    assert stats.bootstrap_mean(x, seed=1)[1:] != (lo, hi)  # a real resampling, not a formula
    assert stats.summary([1.0, float("nan"), 3.0])["n"] == 2


# ---------------------------------------------------------------- scenarios
def test_builtin_scenarios_load():
    names = scenarios.builtin()
    assert {"refund", "refund_arrow", "access", "refund_readback", "refund_polarity", "agent_policy"} <= set(names)
    for n in names:
        assert scenarios.get(n).name == n


def test_tiny_scenario_pairs_are_aligned(tiny_scenario):
    model = tiny_model("llama")
    p = tiny_scenario.pair(model, 0)
    assert len(p.old_ids) == len(p.new_ids) and p.old != p.new
    assert set(p.diff_slots) <= set(p.span_slots)
    assert p.regions[0] == "sink" and p.regions[-1] == "decision"
    assert {p.regions[i] for i in p.span_slots} == {"field"}
    assert p.expect_old == -p.expect_new


def test_scenario_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_TOML.replace('kind = "gate"', 'kind = "gate"\ncolour = "red"'))
    with pytest.raises(ScenarioError, match="unknown key.*colour"):
        scenarios.get(bad)
    bad.write_text(TINY_TOML.replace('field = "status"\n', ""))
    with pytest.raises(ScenarioError, match="missing key.*field"):
        scenarios.get(bad)
    bad.write_text(TINY_TOML.replace('negative_values = ["bad!", "lost"]', 'negative_values = ["awful"]'))
    with pytest.raises(ScenarioError, match="'good' and 'awful'.*different lengths"):
        scenarios.get(bad).check_values(tiny_model("llama"))
    with pytest.raises(ScenarioError, match="unknown scenario"):
        scenarios.get("nope")
    with pytest.raises(ScenarioError, match="no scenario file"):
        scenarios.get(tmp_path / "missing.toml")


def test_value_that_merges_with_its_neighbour_is_refused(smollm2, tmp_path):
    path = tmp_path / "merge.toml"
    path.write_text(TINY_TOML.replace('query = "#{id} status: {value}. go ->"', 'query = "#{id} status: x{value}. go ->"')
                    .replace('positive_values = ["good"]', 'positive_values = ["delivered"]')
                    .replace('negative_values = ["bad!", "lost"]', 'negative_values = ["cancelled"]')
                    .replace('answers = { positive = "Y", negative = "N" }', 'answers = { positive = " yes", negative = " no" }'))
    with pytest.raises(ScenarioError, match="inside token|merge"):
        scenarios.get(path).pair(smollm2, 0)


# ---------------------------------------------------------------- the battery
def test_battery_sanity_on_tiny(tiny_scenario):
    model = tiny_model("llama")
    for variant in range(3):
        st = prefill_pair(model, tiny_scenario.pair(model, variant))
        full_old = model.run(list(st.pair.old_ids), logits="last").logits[0, -1]
        assert float(full_old[st.pair.good] - full_old[st.pair.bad]) == pytest.approx(st.s_old, abs=1e-4)
        kv = sweeps.kv_battery(model, st)
        assert kv["downstream"] == pytest.approx(1.0, abs=1e-4)
        assert kv["stale"] == pytest.approx(0.0, abs=1e-4)
        assert kv["suffix_fraction"][-1] == pytest.approx(1.0, abs=1e-4)
        assert len(kv["per_layer"]) == model.spec.n_layers


@pytest.mark.slow
def test_battery_sanity_and_flips_on_smollm2(smollm2):
    sc = scenarios.get("refund")
    states = [prefill_pair(smollm2, p) for p in sc.pairs(smollm2, 4)]
    assert sum(s.flips for s in states) >= 2  # the scenario is competent at 135M (~58% flip)
    for st in states:
        kv = sweeps.kv_battery(smollm2, st)
        assert kv["downstream"] == pytest.approx(1.0, abs=1e-4)
        assert kv["stale"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_resid_pre_patching_matches_transformer_lens(smollm2):
    """notekv's batched activation patching vs TransformerLens's own patching helper on the
    Bridge, same pairs, same cells."""
    import pandas as pd
    from transformer_lens import patching

    from notekv.backends.tl import TLBackend

    bridge = TLBackend(smollm2).bridge
    sc = scenarios.get("refund_arrow")
    for variant in (0,):  # TL runs one full forward per cell: keep the cell count small
        st = prefill_pair(smollm2, sc.pair(smollm2, variant))
        ours = sweeps.activation_patching(smollm2, st, sites=(), heatmap_site="resid_pre")
        start = ours["tail_slots"][0]
        layers = [0, 18]
        positions = [p_ for p_ in ours["tail_slots"] if p_ in st.pair.diff_slots] + ours["tail_slots"][-1:]
        old, new = torch.tensor([st.pair.old_ids]), torch.tensor([st.pair.new_ids])
        _, clean_cache = bridge.run_with_cache(new)
        p = st.pair

        def metric(logits):
            return (logits[0, -1, p.good] - logits[0, -1, p.bad] - st.s_old) / (st.s_new - st.s_old)
        index = pd.DataFrame([(l, q) for l in layers for q in positions], columns=["layer", "pos"])
        tl = patching.generic_activation_patch(bridge, old, clean_cache, metric, patching.layer_pos_patch_setter,
                                               "resid_pre", index_axis_names=None, index_df=index)
        mine = torch.tensor([ours["heatmap"][l][q - start] for l in layers for q in positions])
        assert torch.allclose(tl.flatten().float(), mine, atol=1e-4), (tl.flatten() - mine).abs().max()


# ---------------------------------------------------------------- report
STAGES = ("prefill", "attribution", "kv_patching", "notes_knockout", "attention_mass", "activation_patching",
          "read_heads", "write_direction")


def check_stages_ran(d: dict, n_layers: int) -> None:
    """Every stage of the report ran and its exact sanity rows hold: patching the whole field
    onward restores NEW (recovery 1), patching nothing keeps OLD (recovery 0)."""
    assert set(STAGES) <= set(d["timings"]), d.get("timings")
    assert d["n_used"] >= 4 and d["recovery"]["downstream"]["n"] == d["n_used"]
    assert d["sanity"]["max_abs_downstream_minus_1"] < 1e-2 and d["sanity"]["max_abs_stale"] < 1e-2, d["sanity"]
    assert len(d["recovery"]["per_layer"]) == n_layers and d["notes"] and d["read_heads"]
    grid = d["kv_heatmap"]["grid"]
    assert len(grid) == n_layers and all(len(row) == len(d["kv_heatmap"]["positions"]) for row in grid)


def test_report_on_tiny_writes_both_files_and_runs_every_stage(tiny_scenario, tmp_path, monkeypatch):
    """A random tiny model barely moves its decision, so the screen's swing floor is lifted to
    run every stage: this checks the report's machinery, not a finding."""
    import circuits.report as report

    monkeypatch.setattr(report, "MIN_SWING", 0.0)
    model = tiny_model("llama")
    rep = CircuitReport.build(model, str(tmp_path / "tiny_gate.toml"), pairs=12, screen="swing", act_pairs=2,
                              heatmap_pairs=1, progress=False)
    rep.save(tmp_path / "out")
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["model"] == "tiny-llama" and d["n_pairs"] == 12
    assert "<html>" in (tmp_path / "out" / "index.html").read_text()[:200]
    assert "verdict" in d
    check_stages_ran(d, model.spec.n_layers)


REPORT_KEYS = ["model", "scenario", "n_pairs", "n_flipping", "notes", "delimiter_share", "read_heads",
               "attention_mass", "write"]


@pytest.mark.slow
def test_report_cli_on_smollm2_at_reduced_size(tmp_path):
    from notekv_cli import main

    out = tmp_path / "refund"
    assert main(["report", "--model", "smollm2-135m", "--scenario", "refund", "--out", str(out), "--pairs", "10",
                 "--act-pairs", "1", "--heatmap-pairs", "1"]) == 0
    d = json.loads((out / "report.json").read_text())
    for k in REPORT_KEYS:
        assert k in d, k
    r = d["recovery"]
    for k in ("field_only", "downstream"):
        assert set(r[k]) >= {"mean", "ci", "n"}
    assert r["top_k_at"]["k"] == 8 and r["random_k_at"]["k"] == 8
    assert d["sanity"]["max_abs_downstream_minus_1"] < 1e-4 and d["sanity"]["max_abs_stale"] < 1e-4
    assert set(d["attention_mass"]) >= {"field", "downstream", "sinks"}
    assert {"position", "token", "region", "recovery"} <= set(d["notes"][0])
    assert {"layer", "head", "recovery"} <= set(d["read_heads"][0])
    assert "attn_share" in d["write"]
    html = (out / "index.html").read_text()
    # plotly.js embedded (no external script): the page opens offline.
    assert "plotly.js v" in html[:2000] and len(html) > 1_000_000
    assert "<script src=" not in html
    # the page shows the circuit: notes, one prompt highlighted, read heads, captions, provenance
    for text in ("The notes", "notes highlighted", "Read heads", "<figcaption>", "2606.17107", "fingerprint",
                 "seed 0"):
        assert text in html, text
    assert {"kv_heatmap", "read_heads_joint", "attribution_scatter", "attribution_heatmap"} <= set(_figure_names(d))
    # short prompt: exact patching ranks, and the attribution map is checked against it
    at = d["attribution"]
    assert at["method"] == "exact" and d["notes_ranked_by"] == "exact" and d["read_heads_ranked_by"] == "dla"
    assert at["agreement"]["cells"]["spearman"]["n"] == at["agreement"]["n_pairs"] >= 2
    assert len(at["scatter"]["exact"]) == len(at["scatter"]["estimate"]) > 0
    assert d["kv_heatmap"]["method"] == "exact"
    # slots pooled by role: no slot before the field's value carries recovery in the notes table
    first = min(d["example"]["value_slots"])
    for n in d["notes"]:
        if n["role"].startswith("field-") or (n["position"] is not None and n["position"] < first):
            assert abs(n["recovery_selection"]) < 1e-3 and abs(n["evaluation"]["mean"]) < 1e-3, n
    assert any(n["role"] == "value+0" for n in d["notes"])
    # the write where the notes are read, top/random at a fraction, the delimiter split, the weights
    assert d["write"]["read_layers"] and d["write"]["closure"] < 1e-3
    assert "top_fraction_at" in r and d["delimiters"]["n_pairs"] == d["n_evaluation"]
    assert "4-bit GGUF" in html and "dequantized to float32" in html  # the weights, on the provenance line
    for text in ("Notes on delimiter tokens?", "Who writes the notes, where they are read", "of the slots here",
                 "pooled across pairs by role"):
        assert text in html, text
    assert d["complete"] is True and d["made_by"] == "notekv report"
    _check_in_browser(out / "index.html", n_figures=len(_figure_names(d)))


def _figure_names(d):
    from circuits import report_page

    return report_page.figures_of(d)


def _check_in_browser(page, n_figures: int) -> None:
    """Load the page in headless Chromium: every figure renders, nothing reaches the console."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):  # scripts/setup.sh installs it where CI runs: there the page must render
            pytest.fail("no Chromium under CI: scripts/setup.sh should have installed Debian's chromium")
        pytest.skip("no Chromium on this machine (apt-get install chromium) to render the report page")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    dom = proc.stdout
    assert dom.count('svg-container') >= n_figures, (dom.count('svg-container'), n_figures)
    console = [l for l in proc.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]
    assert not console, console


@pytest.mark.slow
def test_report_cli_on_gemma3_at_reduced_size(tmp_path):
    from notekv_cli import main

    out = tmp_path / "gemma"
    assert main(["report", "--model", "gemma3-270m", "--scenario", "refund", "--out", str(out), "--pairs", "8",
                 "--act-pairs", "1", "--heatmap-pairs", "1", "--ranking", "attribution"]) == 0
    d = json.loads((out / "report.json").read_text())
    assert d["model"] == "gemma3-270m" and d["n_pairs"] == 8 and "verdict" in d
    assert (out / "index.html").exists()
    # the long-prompt path, asked for: attribution ranks, the ranked slots are patched exactly
    assert "recovery" in d, d["verdict"]
    assert d["attribution"]["method"] == "attribution" and d["notes_ranked_by"] == "attribution"
    assert d["read_heads_ranked_by"] == "attribution" and d["kv_heatmap"]["method"] == "attribution"
    assert d["heatmap"]["method"] == "attribution"
    assert all(n["recovery"] is not None for n in d["notes"][:8])  # every ranked note verified exactly


@pytest.mark.slow
@pytest.mark.parametrize("name", scenarios.builtin())
def test_every_builtin_scenario_makes_aligned_pairs_on_both_models(name, smollm2, gemma3):
    sc = scenarios.get(name)
    for model in (smollm2, gemma3):
        sc.check_values(model)
        p = sc.pair(model, 3)
        assert len(p.old_ids) == len(p.new_ids) and set(p.diff_slots) <= set(p.span_slots)
