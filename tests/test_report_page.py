"""What the report page claims: slots pooled by role (no slot before the value carries
recovery), the write measured where the notes are read, top/random at a fraction of the
slots, the delimiter split, the weights' provenance; and the command's output directory,
partial reports and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import notekv as nk
from circuits import discover, scenarios
from circuits.report import CircuitReport
from conftest import TINY_TOML, tiny_model

ROOT = Path(__file__).resolve().parents[1]

# Names of different lengths between the value and the decision: on the byte-level tiny
# tokenizer the value sits 3 or 11 slots further from the decision from pair to pair.
NAMES_TOML = (TINY_TOML.replace('query = "#{id} status: {value}. go ->"', 'query = "#{id} status: {value}. {name} go ->"')
              .replace('example = "#{id} status: {value}. go -> {answer}\\n"',
                       'example = "#{id} status: {value}. {name} go -> {answer}\\n"')
              + 'names = ["Al", "Maximilian", "Bo", "Jo"]\n')


def _tiny_report(path: Path, out: Path | None = None, **kw) -> CircuitReport:
    """A report on the random tiny model with the swing floor lifted (every stage runs; this
    checks the report's machinery, not a finding)."""
    import circuits.report as report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "MIN_SWING", 0.0)
        if out is not None:
            kw["out"] = out
        return CircuitReport.build(tiny_model("llama"), str(path), pairs=kw.pop("pairs", 14), screen="swing",
                                   act_pairs=2, heatmap_pairs=kw.pop("heatmap_pairs", 3), progress=False, **kw)


@pytest.fixture(scope="module")
def names_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    path = tmp / "names.toml"
    path.write_text(NAMES_TOML)
    rep = _tiny_report(path, seed=2)  # a split whose example pair has a short name (offsets would mislabel it)
    out = rep.save(tmp / "out")
    return rep.data, (out / "index.html").read_text(), path


def _value_start(example: dict) -> int:
    if "value_slots" in example:
        return min(example["value_slots"])
    field = [i for i, r in enumerate(example["regions"]) if r == "field"]  # byte-level: a character a slot
    return max(field) - len(example["old_value"]) + 1


# ---------------------------------------------------------------- pooled by role
def test_no_slot_before_the_value_carries_recovery_in_the_notes_table(names_report):
    d, page, _ = names_report
    assert "notes" in d, d.get("too_few_pairs")
    first = _value_start(d["example"])
    before = [n for n in d["notes"] if n["position"] is not None and n["position"] < first]
    for n in d["notes"]:
        if n in before or n.get("role", "").startswith("field-"):
            # the same K/V in OLD and NEW: patching it changes nothing in any pair pooled (up to the
            # float32 noise of a batched decode step over a tiny random model's small swing)
            assert abs(n["recovery_selection"]) < 1e-3 and abs(n["evaluation"]["mean"]) < 1e-3, n
    assert d["alignment"]["n_layouts"] > 1  # the names do shift the slots
    assert "pooled across pairs by role" in page


def test_roles_match_slots_by_what_they_are_not_their_distance(tmp_path):
    path = tmp_path / "names.toml"
    from circuits import roles

    path.write_text(NAMES_TOML)
    model = tiny_model("llama")
    sc = scenarios.get(path)
    states = [_stand_in(sc.pair(model, v)) for v in range(12)]
    rm = roles.Roles(states)
    assert len({st.n_ctx - min(st.pair.diff_slots) for st in states}) > 1  # offsets of the value differ
    tokens_of: dict[str, set] = {}
    for st in states:
        r = rm.of(st)
        first = min(st.pair.diff_slots)
        assert all(roles.precedes_value(r[q]) == (q < first) for q in r)
        for q, role in r.items():
            tokens_of.setdefault(role, set()).add(st.pair.tokens[q])
        assert r[first - 1] == "field-1" and st.pair.tokens[first - 1] == " "
        assert rm.offsets(st, ["'-'#1"]) == [1]  # the last slot before the decision ('>' decides)
    for role, toks in tokens_of.items():
        if roles.token_of(role) is not None:  # a kept token role is one token in every pair
            assert toks == {roles.token_of(role)}, (role, toks)
    first_letters = tokens_of["after:' '#3:1"]  # the first token after '. ', whatever the name
    assert len(first_letters) >= 2 and first_letters <= {"A", "M", "B", "J"}, first_letters


@pytest.mark.slow
@pytest.mark.parametrize("name", scenarios.builtin())
def test_roles_on_the_builtin_scenarios_on_smollm2(name, smollm2):
    """Names, ids and values tokenize to different lengths on SmolLM2, so offsets from the
    decision mix tokens; roles hold one token each and none before the value."""
    from circuits import roles

    sc, _ = scenarios.get(name).usable(smollm2)
    states = [_stand_in(p) for p in sc.pairs(smollm2, 24)]
    rm = roles.Roles(states)
    held: dict[str, set] = {}
    by_offset: dict[int, set] = {}
    for st in states:
        first = min(st.pair.diff_slots)
        for q, role in rm.of(st).items():
            assert roles.precedes_value(role) == (q < first), (role, q, first)
            held.setdefault(role, set()).add(st.pair.tokens[q])
            by_offset.setdefault(st.n_ctx - q, set()).add(st.pair.tokens[q])
    for role, toks in held.items():
        if roles.token_of(role) is not None:
            assert toks == {roles.token_of(role)}, (role, toks)
    if name == "refund":  # one- and two-token names: an offset holds different tokens from pair to pair
        assert any(len(toks) > 1 and ":" in toks for toks in by_offset.values())


def _stand_in(pair):
    """What roles read of a prefilled pair, without the prefill."""
    n_ctx = pair.n - 1
    return SimpleNamespace(pair=pair, n_ctx=n_ctx, downstream=list(range(max(pair.span_slots) + 1, n_ctx)))


def test_heatmaps_say_what_they_pooled(names_report):
    d, page, _ = names_report
    for key in ("kv_heatmap", "heatmap"):
        h = d[key]
        assert h["aligned_by"] == "role" and len(h["n_per_column"]) == len(h["positions"]) == len(h["grid"][0])
        assert 0 < h["n_complete"] <= h["n"] and max(h["n_per_column"]) == h["n"]
    kh = d["kv_heatmap"]
    assert f"{kh['n_complete']} of {kh['n']} evaluation pairs have every column" in page


# ---------------------------------------------------------------- the write, where it is read
def test_the_write_is_measured_into_the_read_layers(names_report):
    d, page, _ = names_report
    w = d["write"]
    heads = [(h["layer"], h["head"]) for h in d["read_heads"][:4]]
    assert w["read_heads"] == [list(h) for h in heads]
    assert w["read_layers"] == sorted({l for l, _ in heads if l > 0}) or w["layers_chosen"].startswith("every")
    assert w["site"] == "resid_pre" and w["closure"] < 1e-4
    for r in w["per_read_layer"]:
        assert r["attn_share"]["mean"] + r["mlp_share"]["mean"] == pytest.approx(1.0, abs=1e-4)
    at = ", ".join(f"L{l}" for l in w["read_layers"])
    assert f"resid_pre of {at}" in page and "Who writes the notes, where they are read" in page


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox"])
def test_write_decomposition_closes_on_the_residual_entering_each_layer(arch, tiny_scenario):
    from circuits.pairstate import prefill_pair

    model = tiny_model(arch)
    st = prefill_pair(model, tiny_scenario.pair(model, 0))
    w = discover.write_decomposition(model, st)
    L = model.spec.n_layers
    assert w["closure"] < 1e-5
    for l in range(1, L):
        assert all(w["attn"][l][j] == 0.0 and w["mlp"][l][j] == 0.0 for j in range(l, L))  # nothing writes above
        assert sum(w["attn"][l]) + sum(w["mlp"][l]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- comparable comparisons
def test_top_and_random_are_also_compared_at_a_fraction_of_the_slots(names_report):
    d, page, _ = names_report
    rec = d["recovery"]
    n = rec["n_slots"]
    assert n["min"] <= n["median"] <= n["max"]
    fk = {r["k"]: r for r in rec["k_as_fraction"]}
    assert n["min"] > 8 and 8 / n["max"] <= fk[8]["mean"] <= 8 / n["min"]
    for kind in ("top", "random"):
        fr = rec[f"{kind}_fraction"]
        assert [r["fraction"] for r in fr] == [0.05, 0.1, 0.25, 0.5] and all(r["n"] == d["n_evaluation"] for r in fr)
        assert all(r["k"]["mean"] >= 1 for r in fr)
    assert f"({fk[8]['mean']:.0%} of the slots here)" in page and "hundreds" in page
    assert "top 5% of the slots" in page and "random 5% of the slots" in page
    assert "Top vs random at a fraction of the slots" in page


# ---------------------------------------------------------------- delimiters
def _delim_state(tokens):
    return SimpleNamespace(pair=SimpleNamespace(tokens=tokens), downstream=list(range(1, len(tokens))))


def test_delimiter_split_counts_recovery_against_the_share_of_slots():
    st = _delim_state(["x:", ".", " a", "\n", " b"])  # slot 0 is the field; 1..4 after it
    split = discover.delimiter_split([{0: 0.9, 1: 0.6, 2: 0.1, 3: 0.2, 4: -0.3}], [st])[0]
    assert split["slot_share"] == 0.5 and split["n_delimiter"] == 2 and split["n_other"] == 2
    assert split["mass_share"] == pytest.approx(0.8 / 0.9)  # the field's 0.9 is not a note; negatives add no mass
    assert split["delimiter_mean"] == pytest.approx(0.4) and split["other_mean"] == pytest.approx(-0.1)
    assert discover.delimiter_share([{0: 0.9, 1: 0.6, 2: 0.1, 3: 0.2, 4: -0.3}], [st]) == pytest.approx(0.8 / 0.9)


def test_the_page_states_the_delimiter_split_and_its_finding(names_report):
    d, page, _ = names_report
    dl = d["delimiters"]
    assert {"mass_share", "slot_share", "excess", "delimiter_mean", "other_mean", "finding", "shows"} <= set(dl)
    assert dl["n_pairs"] == d["n_evaluation"] and dl["n_delimiter_slots"] > 0 and dl["n_other_slots"] > 0
    assert "Notes on delimiter tokens?" in page and dl["finding"] in page
    assert f"Does {d['model']} show notes on delimiter tokens here?" in page
    assert "Notes on delimiter tokens:" in d["verdict"]


# ---------------------------------------------------------------- provenance
def test_the_page_says_where_the_weights_came_from(names_report):
    d, page, _ = names_report
    assert d["provenance"]["summary"] and f"weights: {d['provenance']['summary']}" in page


def test_provenance_without_a_record_reads_the_bundled_list():
    from circuits.report import provenance

    p = provenance(SimpleNamespace(name="smollm2-135m"))
    assert "GGUF" in p["summary"] and "dequantized to float32" in p["summary"] and p["format"] == "gguf"
    assert "not recorded" in provenance(SimpleNamespace(name="mine"))["summary"]


# ---------------------------------------------------------------- partial reports
def test_each_finished_stage_is_written_and_a_failure_keeps_them(tmp_path, monkeypatch):
    import circuits.report as report

    path = tmp_path / "names.toml"
    path.write_text(NAMES_TOML)
    seen = []

    def boom(b):
        seen.append(json.loads((tmp_path / "out" / "report.json").read_text()))
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(report, "_stage_read_heads", boom)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.html").write_text("an earlier run's page")
    with pytest.raises(RuntimeError, match="disk on fire"):
        _tiny_report(path, out=tmp_path / "out", pairs=10, heatmap_pairs=1)
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert seen[0]["stages_done"] == ["prefill", "attribution", "kv_patching", "notes_knockout", "attention_mass",
                                      "activation_patching"] and seen[0]["complete"] is False
    assert d["complete"] is False and d["failed_stage"] == "read_heads" and "disk on fire" in d["error"]
    assert "notes" in d and "activation_patching" in d and "read_heads" not in d
    assert not (tmp_path / "out" / "index.html").exists()  # it would describe another run


def test_a_complete_report_says_so(names_report):
    d, _, _ = names_report
    assert d["complete"] is True and d["stages_done"][-1] == "circuit" and len(d["stages_done"]) == 9


# ---------------------------------------------------------------- the command line
def _main(argv):
    from notekv_cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left the command as a traceback")


def _tiny_cli(monkeypatch):
    import circuits.report as report

    monkeypatch.setattr(nk, "load", lambda *a, **k: tiny_model("llama"))
    monkeypatch.setattr(report, "MIN_SWING", 0.0)


def test_default_out_is_named_for_the_model_and_the_scenario():
    from notekv_cli.args import default_out

    assert default_out("smollm2-135m", "refund") == Path("reports/smollm2-135m-refund")
    assert default_out("smollm2-135m", "access") != default_out("smollm2-135m", "refund")
    assert default_out("/m/SmolLM2.Q4_1.gguf", "/s/my gate.toml") == Path("reports/SmolLM2.Q4_1-my-gate")
    assert default_out("/models/hf_dir/", "refund") == Path("reports/hf_dir-refund")


def test_report_refuses_a_directory_it_did_not_make_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(nk, "load", lambda *a, **k: pytest.fail("loaded before the --out check"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert _main(["report", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty (thesis.tex)" in err and "--force" in err, err
    (mine / "report.json").write_text('{"a": 1}')  # not a notekv report either
    assert _main(["report", "--out", str(mine)]) == 2
    assert (mine / "thesis.tex").read_text() == "precious"


def test_report_force_writes_into_a_directory_it_did_not_make(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(nk, "load", lambda *a, **k: (_ for _ in ()).throw(nk.InputError("stop after the check")))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert _main(["report", "--out", str(mine), "--force"]) == 2
    assert "stop after the check" in capsys.readouterr().err


def test_report_default_out_and_a_second_run_into_its_own_directory(tmp_path, capsys, monkeypatch):
    _tiny_cli(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "names.toml").write_text(NAMES_TOML)
    argv = ["report", "--scenario", "names.toml", "--pairs", "8", "--act-pairs", "1", "--heatmap-pairs", "1",
            "--screen", "swing"]
    assert _main(argv) == 0
    out = tmp_path / "reports" / "smollm2-135m-names"
    d = json.loads((out / "report.json").read_text())
    assert d["made_by"] == "notekv report" and d["complete"] is True and (out / "index.html").exists()
    (out / "my_notes.md").write_text("kept")  # a file of the user's beside the report
    assert _main(argv + ["--seed", "1"]) == 0  # the second run replaces notekv's own report
    assert json.loads((out / "report.json").read_text())["seed"] == 1 and (out / "my_notes.md").exists()
    assert _main(argv + ["--out", "reports/refund"]) == 0  # the README's explicit --out, twice
    assert _main(argv + ["--out", "reports/refund"]) == 0
    assert "wrote reports/refund/report.json" in capsys.readouterr().out


def test_ctrl_c_in_a_stage_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import circuits.report as report

    _tiny_cli(monkeypatch)

    def interrupt(b):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "_stage_read_heads", interrupt)
    (tmp_path / "names.toml").write_text(NAMES_TOML)
    out = tmp_path / "out"
    code = _main(["report", "--scenario", str(tmp_path / "names.toml"), "--out", str(out), "--pairs", "14",
                  "--act-pairs", "1", "--heatmap-pairs", "1", "--screen", "swing"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("notekv report: interrupted; 6 finished stages") and "complete" in err, err
    d = json.loads((out / "report.json").read_text())
    assert d["complete"] is False and d["failed_stage"] == "read_heads" and d["error"] == "interrupted"


SIGINT_SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {tests!r})
    import notekv as nk
    import circuits.report as report
    from conftest import tiny_model
    from notekv_cli import main
    nk.load = lambda *a, **k: tiny_model("llama")
    report.MIN_SWING = 0.0
    report._stage_read_heads = lambda b: time.sleep(120)
    sys.exit(main(sys.argv[1:]))
''')


def test_sigint_mid_report_exits_130_with_one_line_and_keeps_the_finished_stages(tmp_path):
    (tmp_path / "names.toml").write_text(NAMES_TOML)
    (tmp_path / "run.py").write_text(SIGINT_SCRIPT.format(tests=str(ROOT / "tests")))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), "report", "--scenario",
                             str(tmp_path / "names.toml"), "--out", str(out), "--pairs", "14", "--act-pairs", "1",
                             "--heatmap-pairs", "1", "--screen", "swing"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if "activation_patching" in json.loads((out / "report.json").read_text())["stages_done"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stderr)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("notekv report: interrupted;"), stderr
    d = json.loads((out / "report.json").read_text())
    assert d["complete"] is False and d["stages_done"][-1] == "activation_patching"


# ---------------------------------------------------------------- the stored notebook
def test_notebook_02_is_stored_at_a_size_whose_intervals_mean_something_or_says_toy():
    """The located-notes notebook is what a code host shows: its battery ran on at least 30
    usable pairs (the project's n for a reported rate), or every figure's title says toy n."""
    import re

    nb = json.loads((ROOT / "notebooks" / "02_locate_notes.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    found = re.search(r"(\d+) usable pairs: (\d+) selection, (\d+) evaluation", text)
    titles = [o["data"]["application/vnd.plotly.v1+json"]["layout"].get("title", {}).get("text", "")
              for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    battery = [t for t in titles if "patching, NEW into OLD" not in t]  # the report's figures, not the one-pair sweep
    assert battery
    if not (found and int(found.group(1)) >= 30):
        assert all("TOY n" in t for t in battery), (found and found.group(0), battery)
    else:
        assert all("TOY n" not in t for t in battery) and int(found.group(3)) >= 15, found.group(0)


@pytest.mark.slow
def test_head_dla_stays_finite_in_bf16_where_the_residual_has_an_exact_zero(smollm2_bf16):
    """bf16 rounds some coordinates of the final residual to exactly 0; the final norm's
    linearisation there must not turn every head's DLA into nan (the write's read layers come
    from this ranking)."""
    import torch

    from circuits.pairstate import prefill_pair

    L = smollm2_bf16.spec.n_layers
    sc = scenarios.get("refund")
    zero = []
    for variant in range(10):
        st = prefill_pair(smollm2_bf16, sc.pair(smollm2_bf16, variant))
        for cache in (st.old, st.new):
            run = discover._decision_run(smollm2_bf16, cache, st.pair.old_ids[-1], [f"L{L - 1}.resid_post"])
            zero.append(bool((run[f"L{L - 1}.resid_post"][0, -1] == 0).any()))
        assert torch.isfinite(discover.head_dla(smollm2_bf16, st)).all(), variant
    assert any(zero)  # the case this guards is met among these pairs
