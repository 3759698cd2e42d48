"""The report's statistics: distinct pairs, a held-out split by distinct prompt, verdicts that
say what the numbers say, and values that do not align skipped with a warning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from circuits import scenarios
from circuits.report import MIN_USED_PAIRS, CircuitReport, _verdict, split_by_prompt
from conftest import tiny_model

# Only the value varies between variants (no shots, ids or names).
VALUE_ONLY = "\n".join([
    'name = "value_only"', 'kind = "gate"', 'field = "status"', 'positive_values = ["a"]',
    'negative_values = ["b", "c"]', 'answers = { positive = "y", negative = "n" }',
    'policy = "Yes only if status is a."', 'query = "status: {value} ->"', ""])


def _state(old, new):
    return SimpleNamespace(pair=SimpleNamespace(old_ids=tuple(old), new_ids=tuple(new)))


def test_split_keeps_every_prompt_in_one_half():
    states = [_state([1], [2]), _state([2], [1]), _state([3], [4]), _state([5], [6]), _state([6], [7]),
              _state([8], [9]), _state([1], [9])]  # [1]-[2]-[9]-[8] and [5]-[6]-[7] are connected
    for seed in range(20):
        sel, ev = split_by_prompt(states, seed)
        assert len(sel) + len(ev) == len(states)
        prompts = lambda half: {p for s in half for p in (s.pair.old_ids, s.pair.new_ids)}  # noqa: E731
        assert not prompts(sel) & prompts(ev), seed
        assert sel and ev


def test_pairs_are_deduplicated_and_the_verdict_says_too_few(tmp_path):
    path = tmp_path / "value_only.toml"
    path.write_text(VALUE_ONLY)
    model = tiny_model("llama")
    rep = CircuitReport.build(model, str(path), pairs=10, progress=False)
    d = rep.data
    # only the value varies: 10 candidates hold at most 2 x 2 ordered value pairs
    assert d["n_candidates"] == 10 and d["n_pairs"] <= 4
    assert d["n_used"] < MIN_USED_PAIRS and f"n={d['n_used']}" in d["verdict"]
    assert "Too few usable pairs" in d["verdict"] and f"/{d['n_pairs']} pairs" in d["verdict"]


def _d(**kw):
    base = {"model": "m", "n_pairs": 10, "n_flipping": 0, "n_moved": 0, "n_used": 0, "screen": "flip",
            "swing": {"mean": 4.1, "ci": [3.5, 4.8], "n": 10}}
    base.update(kw)
    return base


def _rec(lo, hi, mean=None):
    mean = (lo + hi) / 2 if mean is None else mean
    return {"recovery": {"field_only": {"mean": mean, "ci": [lo, hi]}, "downstream": {"mean": 1.0, "ci": [1, 1]}}}


def test_verdict_separates_moving_from_flipping():
    v = _verdict(_d())
    assert "moves the decision by +4.10 [+3.50, +4.80]" in v and "flips on 0/10 pairs" in v
    assert "Too few usable pairs" in v and "n=0" in v
    still = _verdict(_d(swing={"mean": 0.1, "ci": [-0.2, 0.4], "n": 10}))
    assert "does not move the decision distinguishably from 0" in still
    hint = _verdict(_d(n_moved=8))
    assert "screen='swing'" in hint  # recovery needs a swing, not a flip


def test_verdict_branches_on_the_field_only_interval():
    enough = dict(n_flipping=9, n_used=9)
    assert "almost none" in _verdict(_d(**enough, **_rec(-0.02, 0.05)))
    assert "clear part" in _verdict(_d(**enough, **_rec(0.2, 0.4)))
    assert "not distinguishable" in _verdict(_d(**enough, **_rec(0.02, 0.3)))
    assert "flips on 9/10 pairs" in _verdict(_d(**enough, **_rec(0.2, 0.4)))


def test_values_that_do_not_align_are_skipped_with_a_warning(tmp_path):
    model = tiny_model("llama")  # byte tokenizer: "cc" is one token longer than "a"
    path = tmp_path / "s.toml"
    path.write_text(VALUE_ONLY.replace('["b", "c"]', '["b", "cc"]'))
    sc = scenarios.load(path)
    with pytest.warns(UserWarning, match="'cc'"):
        kept, skipped = sc.usable(model)
    assert kept.negative_values == ("b",) and [s["value"] for s in skipped] == ["cc"]
    assert "tokens" in skipped[0]["reason"]
    path.write_text(VALUE_ONLY.replace('["b", "c"]', '["bb", "cc"]'))
    with pytest.warns(UserWarning), pytest.raises(scenarios.ScenarioError, match="no negative value aligns"):
        scenarios.load(path).usable(model)


def _readme_scenario(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    path = tmp_path / "loan.toml"
    path.write_text(re.search(r"```toml\n(.*?)```", text, re.S).group(1))
    return scenarios.load(path)


def test_the_readme_scenario_format_loads_and_means_what_it_says(tmp_path):
    sc = _readme_scenario(tmp_path)
    assert sc.order == "PNNPNP" and sc.example_negatives == "cycle" and sc.edit_gate()["cue"] == "Loan request:"
    assert sc._values(0) == ("approved", "denied") and sc._values(1) == ("pending", "approved")
    prompt = sc.prompt("approved", 0)
    examples = [line for line in prompt.split("\n")[1:] if "-> loan" in line][: sc.shots]
    labels = "".join("P" if line.endswith("yes") else "N" for line in examples)
    assert labels == sc.order  # the stated order, as written
    negatives = [line.split("credit_status: ")[1].split(".")[0] for line, o in zip(examples, sc.order) if o == "N"]
    assert len(set(negatives)) > 1  # "cycle": the examples walk through the negative values
    assert sc.example_region == "past_loans"


def test_example_region_labels_the_examples_and_is_validated(tmp_path):
    model = tiny_model("llama")
    base = VALUE_ONLY + 'shots = 2\nexample = "status: {value} -> {answer}\\n"\n'
    path = tmp_path / "s.toml"
    path.write_text(base)
    default = scenarios.load(path).pair(model, 0)
    path.write_text(base + 'example_region = "shots"\n')
    sc = scenarios.load(path)
    pair = sc.pair(model, 0)
    assert sc.example_region == "shots" and "examples" not in pair.regions
    assert pair.regions == tuple("shots" if r == "examples" else r for r in default.regions)
    assert pair.regions.count("shots") == default.regions.count("examples") > 0
    # the slots between the policy and the field are the examples: "status: a -> y\n" twice
    first = pair.regions.index("shots")
    assert "".join(pair.tokens[first:first + pair.regions.count("shots")]).count("->") == 2
    for bad in ('""', '"  "', '"policy"', '"field"', '"decision"', "3"):
        path.write_text(base + f"example_region = {bad}\n")
        with pytest.raises(scenarios.ScenarioError, match="example_region"):
            scenarios.load(path)


def test_bad_format_keys_are_refused(tmp_path):
    base = VALUE_ONLY + "shots = 2\nexample = \"status: {value} -> {answer}\\n\"\n"
    for extra, msg in (('order = "PX"\n', "string of P and N"), ('order = "PNP"\n', "one letter per shot"),
                       ('example_negatives = "all"\n', "pair' or 'cycle"),
                       ('value_pairs = [["a", "zz"]]\n', "value_pairs")):
        path = tmp_path / "s.toml"
        path.write_text(base + extra)
        with pytest.raises(scenarios.ScenarioError, match=msg):
            scenarios.load(path)


@pytest.mark.slow
def test_the_readme_scenario_makes_aligned_pairs_on_smollm2(tmp_path, smollm2):
    sc, skipped = _readme_scenario(tmp_path).usable(smollm2)
    pair = sc.pair(smollm2, 1)
    assert (pair.old_value, pair.new_value) == ("pending", "approved")
    assert len(pair.old_ids) == len(pair.new_ids) and set(pair.diff_slots) <= set(pair.span_slots)
    assert "past_loans" in pair.regions and "examples" not in pair.regions


def test_scenarios_command_lists_the_builtins(capsys):
    from notekv_cli import main

    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    for name in scenarios.builtin():
        assert name in out
    assert "refund" in out and "yes" in out  # refund has an [edit] table


def test_figures_bands_take_their_lines_colour_and_a_rate_gets_its_own_axis():
    from circuits import figures

    summ = lambda m: [{"mean": v, "ci": [v - 0.1, v + 0.1]} for v in m]  # noqa: E731
    fig = figures.curves({"recovery": ([0, 0.5, 1], summ([0.9, 0.6, 0.7])),
                          "flip rate": ([0, 0.5, 1], summ([0.95, 0.4, 0.45]))}, "knockout", "fraction",
                         secondary=("flip rate",))
    bands, lines = fig.data[0::2], fig.data[1::2]
    for band, line in zip(bands, lines):
        r, g, b = (int(line.line.color[i:i + 2], 16) for i in (1, 3, 5))
        assert band.fillcolor.startswith(f"rgba({r},{g},{b},") and band.mode == "lines" and band.line.width == 0
        assert band.yaxis == line.yaxis
    assert lines[0].line.color != lines[1].line.color
    assert [l.yaxis for l in lines] == ["y", "y2"]
    y2 = fig.layout.yaxis2
    assert tuple(y2.range) == (0, 1) and y2.tickmode == "linear" and y2.dtick == 0.2 and y2.side == "right"
    heads = figures.head_grid([[0.1, -0.2, 0.3, 0.0]] * 3, "DLA", "logit diff")
    assert heads.layout.xaxis.tickmode == "linear" and heads.layout.xaxis.dtick == 1
