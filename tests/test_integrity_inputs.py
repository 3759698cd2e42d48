"""Degenerate science inputs, small samples and hostile arguments at the science entry points
and the command line: each is refused at the boundary with notekv's own error (naming the
argument, the value and the fix), or runs and says what it could not do; never a meaningless
result with exit 0, a traceback after minutes of work, or a raw torch/stdlib error.

``CASES`` is a table like the misuse table: ``(id, fn(env, tmp_path), error class, regex)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

import notekv as nk
from circuits import scenarios
from circuits.report import CircuitReport
from conftest import TINY_TOML, tiny_model
from evals import compose as eval_compose
from evals import edits as eval_edits
from notekv.attribution import attribute_kv, exact_kv, stack_rows
from notekv.errors import NotekvError

OLD = "status: good. go ->"
NEW = "status: lost. go ->"


class Env:
    def __init__(self):
        self.m = tiny_model("llama")
        self.old = nk.KVCache.prefill(self.m, OLD[:-1])
        self.new = nk.KVCache.prefill(self.m, NEW[:-1])
        self.tok = int(self.m.tokenize(OLD).ids[-1])
        self.ctx = nk.EditableContext(self.m, "Refunds only if delivered.\nstatus: {status}\n",
                                      fields={"status": "delivered"}, cue="Refund:", choices=["yes", "no"]).prefill()


_env: Env | None = None


def env() -> Env:
    global _env
    if _env is None:
        _env = Env()
    return _env


def _toml(t, body: str, name: str = "s.toml"):
    p = t / name
    p.write_text(body)
    return p


def _bytes(t, data: bytes):
    p = t / "b.toml"
    p.write_bytes(data)
    return p


def _load(t, body: str):
    return scenarios.load(_toml(t, body))


def _tiny_sc(t):
    return scenarios.load(_toml(t, TINY_TOML, "tiny_gate.toml"))


def _gate(**change) -> dict:
    g = {"policy": "Refunds only if delivered.", "field": "status", "positive": ["delivered"],
         "negative": ["cancelled"], "line": "Customer", "cue": "Refund:", "answers": ("yes", "no"), "shots": 2,
         "requests": ["Hello."]}
    return {**g, **change}


def _evaluate_edits(e, gate):
    return eval_edits.evaluate(e.m, ["g"], 1, suite={"g": gate}, progress=False)


def _build(e, t, **kw):
    return CircuitReport.build(e.m, str(_toml(t, TINY_TOML, "tiny_gate.toml")), **{"pairs": 2, "progress": False, **kw})


VOCAB = 10 ** 9  # an id far outside any vocabulary

CASES = [
    # -- degenerate science inputs: equal answers, equal values, empty edit values
    ("scenario-file-equal-answers", lambda e, t: _load(t, TINY_TOML.replace('positive = "Y"', 'positive = "N"')),
     scenarios.ScenarioError, "same word 'N' / 'N'"),
    ("scenario-file-answers-equal-after-strip", lambda e, t: _load(t, TINY_TOML.replace('positive = "Y"', 'positive = " N"')),
     scenarios.ScenarioError, "same word"),
    ("scenario-file-value-pair-old-equals-new", lambda e, t: _load(t, TINY_TOML + 'value_pairs = [["good", "good"]]\n'),
     scenarios.ScenarioError, "value_pairs.*equal"),
    ("scenario-file-value-pair-one-side", lambda e, t: _load(t, TINY_TOML + 'value_pairs = [["bad!", "lost"]]\n'),
     scenarios.ScenarioError, "value_pairs.*alike"),
    ("scenario-file-value-on-both-sides", lambda e, t: _load(t, TINY_TOML.replace('["bad!", "lost"]', '["bad!", "good"]')),
     scenarios.ScenarioError, "both 'positive_values' and 'negative_values'"),
    ("scenario-pair-old-equals-new", lambda e, t: _tiny_sc(t).pair(e.m, 0, old="lost", new="lost"),
     scenarios.ScenarioError, "both 'lost'"),
    ("scenario-pair-unknown-value", lambda e, t: _tiny_sc(t).pair(e.m, 0, old="good", new="nope"),
     scenarios.ScenarioError, "'nope' is not one of its values"),
    ("scenario-pair-same-side", lambda e, t: _tiny_sc(t).pair(e.m, 0, old="bad!", new="lost"),
     scenarios.ScenarioError, "both negative values"),
    ("report-equal-answers-scenario", lambda e, t: CircuitReport.build(
        e.m, replace(_tiny_sc(t), answers={"positive": "N", "negative": "N"}), pairs=2, progress=False),
     scenarios.ScenarioError, "same token"),
    ("sweep-equal-answer-ids", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, answers=(5, 5), progress=False),
     nk.InputError, "same token id 5"),
    ("kv-attribution-equal-answer-ids", lambda e, t: nk.kv_attribution(e.m, OLD, NEW, answers=(3, 3)),
     nk.InputError, "same token id 3"),
    ("acts-attribution-equal-answer-ids", lambda e, t: nk.attribute_acts(e.m, OLD, NEW, answers=(3, 3)),
     nk.InputError, "same token id 3"),
    ("exact-kv-equal-answers", lambda e, t: exact_kv(e.m, e.old, e.new, e.tok, 2, 2, [(0, 1)]),
     nk.InputError, "same token id"),
    ("attribute-kv-equal-answers", lambda e, t: attribute_kv(e.m, e.old, e.new, e.tok, 2, 2),
     nk.InputError, "same token id"),
    ("eval-edits-equal-answers", lambda e, t: _evaluate_edits(e, _gate(answers=("yes", " yes"))),
     nk.InputError, "two different"),
    ("eval-edits-value-on-both-sides", lambda e, t: _evaluate_edits(e, _gate(negative=["delivered"])),
     nk.InputError, "both positive and negative"),
    ("eval-compose-keystone-edit-to-same-value", lambda e, t: eval_compose.keystone(
        e.m, edits=[("30", "30")]), nk.InputError, "same value"),
    *[(f"edit-empty-value-{mode}", lambda e, t, mode=mode: e.ctx.edit("status", "", mode=mode), nk.EditError,
       "empty or blank") for mode in ("stale", "erratum", "hoist", "in_place", "full")],
    ("edit-blank-value-erratum", lambda e, t: e.ctx.edit("status", " \n", mode="erratum"), nk.EditError, "empty or blank"),
    # -- out-of-vocabulary answer and token ids
    ("sweep-answer-id-out-of-vocab", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, answers=(VOCAB, 1), progress=False),
     nk.InputError, r"answers\[0\]=1000000000: must be at most 258"),
    ("kv-attribution-answer-id-out-of-vocab", lambda e, t: nk.kv_attribution(e.m, OLD, NEW, answers=(1, VOCAB)),
     nk.InputError, r"answers\[1\]"),
    ("acts-attribution-answer-id-out-of-vocab", lambda e, t: nk.attribute_acts(e.m, OLD, NEW, answers=(VOCAB, 1)),
     nk.InputError, "vocab|at most"),
    ("exact-kv-good-out-of-vocab", lambda e, t: exact_kv(e.m, e.old, e.new, e.tok, VOCAB, 1, [(0, 1)]),
     nk.InputError, "good=1000000000"),
    ("exact-kv-token-out-of-vocab", lambda e, t: exact_kv(e.m, e.old, e.new, VOCAB, 2, 1, [(0, 1)]),
     nk.InputError, "token=1000000000"),
    ("attribute-kv-good-out-of-vocab", lambda e, t: attribute_kv(e.m, e.old, e.new, e.tok, VOCAB, 1),
     nk.InputError, "good"),
    ("attribute-kv-fractional-id", lambda e, t: attribute_kv(e.m, e.old, e.new, e.tok, 2.7, 1),
     nk.InputError, "whole number"),
    # -- bad verify / block / metric / cells arguments
    ("kv-attribution-verify-negative", lambda e, t: nk.kv_attribution(e.m, OLD, NEW, answers=(1, 2), verify=-1),
     nk.InputError, "verify=-1"),
    ("kv-attribution-verify-text", lambda e, t: nk.kv_attribution(e.m, OLD, NEW, answers=(1, 2), verify="x"),
     nk.InputError, "verify='x'"),
    ("kv-attribution-verify-fraction", lambda e, t: nk.kv_attribution(e.m, OLD, NEW, answers=(1, 2), verify=2.5),
     nk.InputError, "verify=2.5"),
    ("sweep-block-text", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, answers=(1, 2), block="2", progress=False),
     nk.InputError, "block='2'"),
    ("sweep-block-fraction", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, answers=(1, 2), block=2.5, progress=False),
     nk.InputError, "block=2.5"),
    ("resid-grid-block-zero", lambda e, t: nk.sweep.resid_patch_grid(e.m, [1, 2, 3], [1, 2, 4], lambda lg: lg[:, 0],
                                                                     block=0, progress=False), nk.InputError, "block=0"),
    ("sweep-slot-fraction", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, answers=(1, 2), slots=[1.5], progress=False),
     nk.InputError, r"slots\[0\]=1.5"),
    ("sweep-layers-text", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, answers=(1, 2), layers="0", progress=False),
     nk.InputError, "layers='0'"),
    *[(f"sweep-metric-wrong-shape-{site}", lambda e, t, site=site: nk.patch_sweep(
        e.m, OLD, NEW, metric=lambda lg: lg, site=site, layers=[0], progress=False), nk.InputError,
       r"metric returned .* shape \(1, 259\)") for site in ("resid_pre", "kv", "attn_out")],
    ("sweep-metric-scalar", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, metric=lambda lg: lg.sum(), progress=False),
     nk.InputError, r"metric returned .* shape \(\)"),
    ("sweep-metric-not-a-tensor", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, metric=lambda lg: 3.0, progress=False),
     nk.InputError, "metric returned a float"),
    ("sweep-metric-not-callable", lambda e, t: nk.patch_sweep(e.m, OLD, NEW, metric=3, progress=False),
     nk.InputError, "metric=3"),
    ("exact-kv-bad-which", lambda e, t: exact_kv(e.m, e.old, e.new, e.tok, 2, 1, [(0, 1)], which="x"),
     nk.InputError, "which='x'"),
    ("exact-kv-cells-text", lambda e, t: exact_kv(e.m, e.old, e.new, e.tok, 2, 1, "ab"), nk.InputError, "cells='ab'"),
    ("exact-kv-fractional-slot", lambda e, t: exact_kv(e.m, e.old, e.new, e.tok, 2, 1, [(0, 1.5)]),
     nk.InputError, "slot=1.5"),
    ("exact-kv-not-a-cache", lambda e, t: exact_kv(e.m, "old", e.new, e.tok, 2, 1, [(0, 1)]),
     nk.InputError, "must be KVCaches"),
    ("stack-rows-empty", lambda e, t: stack_rows([]), nk.InputError, "non-empty list"),
    # -- KVCache arguments
    ("kvcache-expand-zero", lambda e, t: e.old.expand(0), nk.InputError, "batch=0: must be at least 1"),
    ("kvcache-expand-negative", lambda e, t: e.old.expand(-1), nk.InputError, "batch=-1: must be at least 1"),
    ("kvcache-expand-text", lambda e, t: e.old.expand("2"), nk.InputError, "batch='2'"),
    ("kvcache-relabel-not-text", lambda e, t: e.old.relabel(3), nk.InputError, "segment=3"),
    ("kvcache-concat-not-a-cache", lambda e, t: e.old.concat(3), nk.InputError, "not a KVCache"),
    ("kvcache-layer-out-of-range", lambda e, t: e.old.layer_kv(99), nk.InputError, "layer=99"),
    ("kvcache-to-hf-negative-room", lambda e, t: e.old.to_hf(-1), nk.InputError, "room=-1"),
    # -- edit arguments
    ("edit-mode-not-text", lambda e, t: e.ctx.edit("status", "cancelled", mode=3), nk.EditError, "mode=3"),
    ("edit-erratum-template-unknown-placeholder", lambda e, t: e.ctx.edit("status", "cancelled", mode="erratum",
                                                                          template="{nope}"), nk.EditError, "template="),
    ("edit-context-bad-erratum", lambda e, t: nk.EditableContext(e.m, "a {x}\n", fields={"x": "y"}, erratum="{zz}"),
     nk.EditError, "erratum="),
    ("edit-decide-choices-one-string", lambda e, t: e.ctx.decide(choices="yes"), nk.InputError, "list of answer words"),
    ("edit-decide-cue-not-text", lambda e, t: e.ctx.decide(cue=3), nk.InputError, "cue=3"),
    ("edit-reference-unknown-field", lambda e, t: e.ctx.reference({"nope": "x"}), nk.EditError, "unknown"),
    # -- report and evaluation arguments
    ("report-act-pairs-zero", lambda e, t: _build(e, t, act_pairs=0), nk.InputError, "act_pairs=0"),
    ("report-heatmap-pairs-zero", lambda e, t: _build(e, t, heatmap_pairs=0), nk.InputError, "heatmap_pairs=0"),
    ("report-pairs-text", lambda e, t: _build(e, t, pairs="8"), nk.InputError, "pairs='8'"),
    ("report-scenario-not-a-name", lambda e, t: CircuitReport.build(e.m, 3, progress=False), scenarios.ScenarioError,
     "scenario=3"),
    ("eval-edits-zero-cases", lambda e, t: eval_edits.evaluate(e.m, ["refund"], 0),
     nk.InputError, "n_cases=0"),
    ("eval-edits-nan-swing", lambda e, t: eval_edits.evaluate(e.m, ["refund"], 1,
                                                                                  min_swing=float("nan")),
     nk.InputError, "min_swing"),
    # -- scenario files
    ("scenario-directory", lambda e, t: scenarios.get(t), scenarios.ScenarioError, "is a directory"),
    ("scenario-binary-file", lambda e, t: scenarios.load(_bytes(t, b"\xff\xfe\x00")), scenarios.ScenarioError, "UTF-8"),
    ("scenario-answers-not-a-table", lambda e, t: _load(t, TINY_TOML.replace(
        'answers = { positive = "Y", negative = "N" }', "answers = 3")), scenarios.ScenarioError, "'answers'"),
    ("scenario-edit-negative-values-text", lambda e, t: _load(t, TINY_TOML + '[edit]\nline = "C"\ncue = "R:"\n'
                                                              'requests = ["hi"]\nnegative_values = "x"\n'),
     scenarios.ScenarioError, "negative_values"),
    # -- statistics
    ("stats-more-successes-than-trials", lambda e, t: nk.stats.rate(5, 3), nk.InputError, "k=5: must be at most 3"),
    ("stats-negative-count", lambda e, t: nk.stats.wilson(-1, 3), nk.InputError, "k=-1"),
    ("stats-zero-resamples", lambda e, t: nk.stats.bootstrap_mean([1.0, 2.0], n_boot=0), nk.InputError, "n_boot=0"),
    ("stats-not-numbers", lambda e, t: nk.stats.summary(["a"]), nk.InputError, "not a sequence of numbers"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_degenerate_or_bad_input_gets_notekvs_own_error(case, tmp_path):
    _, fn, err, pattern = case
    e = env()
    with pytest.raises(err) as info:
        fn(e, tmp_path)
    assert isinstance(info.value, NotekvError)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_odd_inputs_with_one_right_answer(tmp_path):
    """Right answers beside the refusals: a lone site name is one site, and a value pair of
    two different values on the rule's two sides still makes its pair."""
    e = env()
    att = nk.attribute_acts(e.m, OLD, NEW, answers=(1, 2), sites="resid_pre")
    assert set(att) == {"resid_pre"}
    sc = _load(tmp_path, TINY_TOML + 'value_pairs = [["lost", "good"]]\n')
    p = sc.pair(e.m, 0)
    assert (p.old_value, p.new_value, p.expect_old, p.expect_new) == ("lost", "good", -1, 1)


# ---------------------------------------------------------------- the report on few pairs
SHARED = TINY_TOML.replace("shots = 2\n", "shots = 0\n").replace("#{id} ", "")  # every pair shares a prompt


def _report(tmp_path, monkeypatch, body: str, pairs: int, **kw):
    import circuits.report as report

    monkeypatch.setattr(report, "MIN_SWING", -1e9)  # a random tiny model: every pair is used
    path = _toml(tmp_path, body, "gate.toml")
    rep = CircuitReport.build(tiny_model("llama"), str(path), pairs=pairs, screen="swing", act_pairs=2,
                              heatmap_pairs=1, progress=False, **kw)
    out = rep.save(tmp_path / "out")
    return rep.data, json.loads((out / "report.json").read_text()), (out / "index.html").read_text()


def test_report_whose_pairs_all_share_a_prompt_says_too_few_instead_of_crashing(tmp_path, monkeypatch):
    """All pairs share the positive prompt, so they form one group: the evaluation half takes
    them all and the selection half is empty. The parts that rank on selection pairs say so."""
    d, saved, page = _report(tmp_path, monkeypatch, SHARED, pairs=10)
    assert (d["n_used"], d["n_selection"], d["n_evaluation"]) == (4, 0, 4)
    few = saved["too_few_pairs"]
    assert set(few) == {"notes_knockout", "read_heads", "direction", "circuit"}, few
    assert all(v.startswith("too few pairs (n=0 selection pairs") for v in few.values()), few
    assert "too few pairs (n=0 selection pairs" in page and "Not run" in page
    assert "too few pairs" in d["verdict"]
    for ran in ("recovery", "attention_mass", "activation_patching", "write", "kv_heatmap"):
        assert ran in saved, ran  # what needs no selection half ran


@pytest.mark.parametrize("n_sel,n_ev,ranking", [(0, 1, "exact"), (1, 1, "exact"), (1, 2, "exact"), (2, 1, "exact"),
                                                (2, 0, "exact"), (2, 2, "exact"), (0, 2, "attribution"),
                                                (2, 1, "attribution"), (2, 2, "attribution")])
def test_report_with_halves_of_zero_one_or_two_pairs(n_sel, n_ev, ranking, tmp_path, monkeypatch):
    import circuits.report as report

    monkeypatch.setattr(report, "MIN_USED_PAIRS", 1)
    monkeypatch.setattr(report, "split_by_prompt", lambda states, seed: (states[:n_sel], states[n_sel:n_sel + n_ev]))
    d, saved, page = _report(tmp_path, monkeypatch, TINY_TOML, pairs=n_sel + n_ev, ranking=ranking)
    assert (d["n_selection"], d["n_evaluation"]) == (n_sel, n_ev)
    few = saved.get("too_few_pairs", {})
    need_ev = {"attribution_checks", "activation_patching", "write"}
    need_both = {"notes_knockout", "read_heads", "direction", "circuit"}
    want = (need_ev | need_both if n_ev < report.MIN_HALF else set()) | (need_both if n_sel < report.MIN_HALF else set())
    assert set(few) == want, few
    for part, why in few.items():
        assert re.match(r"too few pairs \(n=\d ", why), why
        assert why in page
    if not want:  # two pairs in each half: every part ran
        assert {"notes", "read_heads", "write", "direction", "kv_heatmap"} <= set(saved)
        assert "too few pairs" not in page


# ---------------------------------------------------------------- the command line
def _cli(argv, capsys):
    from notekv_cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _no_load(monkeypatch):
    monkeypatch.setattr(nk, "load", lambda *a, **k: pytest.fail("a model was loaded before the arguments were checked"))


def _tiny_load_and_no_work(monkeypatch):
    """``nk.load`` gives the tiny model; any forward pass of a report, the demo or an
    evaluation fails the test (the check must come right after the load)."""
    import circuits.report as report
    import notekv.hooks.canaries as canaries

    monkeypatch.setattr(nk, "load", lambda *a, **k: tiny_model("llama"))
    monkeypatch.setattr(report, "prefill_pair", lambda *a, **k: pytest.fail("the report started its work"))
    monkeypatch.setattr(canaries, "run_canaries", lambda *a, **k: pytest.fail("the demo started its work"))


def test_cli_multi_token_answer_is_one_line_right_after_the_load(tmp_path, capsys, monkeypatch):
    _tiny_load_and_no_work(monkeypatch)
    path = _toml(tmp_path, TINY_TOML.replace('positive = "Y"', 'positive = "YES"'), "multi.toml")
    err = _cli(["report", "--scenario", str(path), "--out", str(tmp_path / "out"), "--pairs", "2"], capsys)
    assert "answers.positive 'YES' is 3 tokens" in err and "tiny_gate" in err, err


def test_cli_demo_checks_its_answers_before_the_canaries(capsys, monkeypatch):
    _tiny_load_and_no_work(monkeypatch)  # refund's " granted" is 8 tokens on the byte-level tiny tokenizer
    err = _cli(["demo"], capsys)
    assert "answers.positive ' granted' is 8 tokens" in err, err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--old", "X", "--new", "Y"], "'X' is not one of its values"),
    (["demo", "--old", "delivered", "--new", "delivered"], "both 'delivered'"),
    (["demo", "--old", "cancelled", "--new", "lost"], "both negative values"),
])
def test_cli_demo_refuses_values_it_cannot_pair_before_loading(argv, message, capsys, monkeypatch):
    _no_load(monkeypatch)
    err = _cli(argv, capsys)
    assert err.startswith("notekv demo: ") and message in err, err


def test_cli_scenario_given_a_directory_or_a_degenerate_file(tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    err = _cli(["report", "--scenario", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "is a directory" in err, err
    same = _toml(tmp_path, TINY_TOML.replace('positive = "Y"', 'positive = "N"'), "same.toml")
    err = _cli(["report", "--scenario", str(same), "--out", str(tmp_path / "o")], capsys)
    assert "same word" in err, err
    pairs = _toml(tmp_path, TINY_TOML + 'value_pairs = [["good", "good"]]\n', "pairs.toml")
    err = _cli(["eval-compose", "--scenario", str(pairs), "--out", str(tmp_path / "o")], capsys)
    assert "value_pairs" in err, err


@pytest.mark.parametrize("command,written", [(["report"], "report.json"), (["eval-edits", "--scenario", "refund"], "edits.json"),
                                             (["eval-compose"], "compose.json")])
def test_cli_out_that_cannot_be_written_is_one_line_before_loading(command, written, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    (tmp_path / "taken" / written).mkdir(parents=True)  # the output file's name is taken by a directory
    err = _cli(command + ["--out", str(tmp_path / "taken")], capsys)
    assert "is a directory where the command writes a file" in err, err
    err = _cli(command + ["--out", "/proc/notekv-no-such-dir/out"], capsys)  # a file system that refuses it
    assert "/proc/notekv-no-such-dir" in err, err
    err = _cli(command + ["--out", str(tmp_path / ("x" * 300))], capsys)
    assert "not a usable path" in err, err
