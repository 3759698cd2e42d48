"""Skills, composition and the eval-compose report (tiny models; SmolLM2 checks marked slow)."""

from __future__ import annotations

import json

import pytest
import torch

import notekv as nk
from evals import compose as ce
from notekv.compose import MODES, Skill, SkillStore, compose, text_ids

PREFIX = "Customer record. Plan: premium. Order placed 12 days ago.\n"
POLICY = "Refund policy: refunds within 30 days if unopened.\n"
SUFFIX = "Question: refund? Answer:"


@pytest.fixture(scope="module")
def tiny():
    return nk.tiny("llama")


@pytest.mark.parametrize("mode", MODES)
def test_skill_save_load_bit_exact(tiny, tmp_path, mode):
    skill = Skill.compile(tiny, POLICY, mode=mode, name="refunds")
    assert skill.token_ids == text_ids(tiny, POLICY)
    store = SkillStore(tmp_path / "skills")
    store.put(skill)
    assert store.names() == ["refunds"]
    back = store.get("refunds", tiny)
    assert (back.name, back.text, back.mode, back.prefix) == (skill.name, skill.text, skill.mode, skill.prefix)
    assert torch.equal(back.cache.keys, skill.cache.keys)
    assert torch.equal(back.cache.values, skill.cache.values)
    assert torch.equal(back.cache.positions, skill.cache.positions)
    assert torch.equal(back.cache.token_ids, skill.cache.token_ids)
    with pytest.raises(KeyError, match="no skill 'other'"):
        store.get("other", tiny)


def test_skill_load_refuses_another_model(tiny, tmp_path):
    path = Skill.compile(tiny, POLICY, name="refunds").save(tmp_path / "refunds.nkv")
    other = nk.tiny("llama", seed=1)
    with pytest.raises(nk.CacheMismatchError, match="another model"):
        Skill.load(path, other)


def test_compose_at_original_position_reproduces_full_forward(tiny):
    skill = Skill.compile(tiny, POLICY, mode="prefix", prefix=PREFIX, name="refunds")
    c = compose(tiny, PREFIX, [skill], SUFFIX)
    ids = list(tiny.tokenize(PREFIX, special=True).ids) + text_ids(tiny, POLICY) + text_ids(tiny, SUFFIX)
    full = tiny.run(torch.tensor([ids]), logits="all").logits[0]
    n = len(text_ids(tiny, SUFFIX))
    assert (c.logits[0] - full[-n:]).abs().max() <= 1e-5
    assert c.cache.token_ids.tolist() == ids
    assert c.spans["refunds"][1] - c.spans["refunds"][0] == len(skill)
    # continuing from the composed cache equals continuing from the full prefill
    more = tiny.run(" Yes", past=c.cache, logits="last").logits[0, -1]
    ref = tiny.run(torch.tensor([ids + text_ids(tiny, " Yes")]), logits="last").logits[0, -1]
    assert (more - ref).abs().max() <= 1e-5
    gen = tiny.generate(" Yes", past=c.cache, max_new_tokens=3)
    assert gen.new_ids.shape[1] == 3


def test_rotation_moves_skill_keys_into_place(tiny):
    """An isolated skill spliced after a prefix has the keys of its text prefilled at that offset
    (up to the prefix it never saw: compare layer 0, whose keys depend only on the token)."""
    skill = Skill.compile(tiny, POLICY, mode="isolated", name="p")
    pre = list(tiny.tokenize(PREFIX, special=True).ids)
    c = compose(tiny, pre, [skill])
    a, b = c.spans["p"]
    placed = c.cache.keys[0, :, :, a:b]
    at = nk.KVCache.prefill(tiny, torch.tensor([text_ids(tiny, POLICY)]), offset=a).keys[0]
    assert (placed - at).abs().max() < 1e-4
    unrot = ce._unrotated(skill, a)
    moved = compose(tiny, pre, [unrot]).cache.keys[0, :, :, a:b]
    assert (moved - at).abs().max() > 1e-2  # the control really keeps the old rotation


def test_compare_metrics_zero_for_identical_and_positive_otherwise():
    ref = torch.randn(4, 50)
    m = ce.compare(ref, ref.clone(), 1, 2)
    assert m["kl_mean"] < 1e-12 and m["top1"] == 1.0 and m["top5"] == 1.0 and m["margin_err"] == 0.0
    other = ce.compare(ref, ref + torch.randn(4, 50), 1, 2)
    assert other["kl_mean"] > 1e-3 and other["cos_last"] < 1.0


def test_agent_runs_ten_turns(tiny):
    # compiled behind the agent's own prefix, the splice is exact: the incremental loop must then
    # match the full recompute every turn up to fp32 noise
    skill = Skill.compile(tiny, ce.SKILLS["refunds"], mode="prefix", prefix=ce.PREFIXES[0], name="refunds")
    r = ce.agent(tiny, skill, turns=ce.AGENT_TURNS[:10])
    assert r["n_turns"] == 10 and len(r["per_turn"]) == 10
    assert r["agreement"]["k"] == 10
    assert r["margin_err"]["mean"] < 1e-4
    assert r["per_turn"][-1]["t_full_cum_s"] > 0 and r["per_turn"][-1]["t_composed_cum_s"] > 0
    assert r["per_turn"][-1]["context_tokens"] > r["per_turn"][0]["context_tokens"]


def test_eval_compose_tiny_writes_every_metric(tiny, tmp_path):
    bf = nk.tiny("llama", dtype=torch.bfloat16)
    r = ce.evaluate("tiny-llama", n_pairs=3, agent_turns=10, keystone_prefixes=3, model=tiny, floor_model=bf)
    out = ce.save(r, tmp_path / "out")
    data = json.loads((out / "compose.json").read_text())
    html = (out / "index.html").read_text()
    assert "plotly" in html.lower() and "<table>" in html
    arms = data["fidelity"]["arms"]
    expected = set(MODES) | {f"seam{k}" for k in range(5)} | {"floor_incremental", "floor_bf16", "unrotated",
                                                            "no_skill"}
    assert expected <= set(arms)
    for arm in expected:
        for k in ce.METRICS:
            s = arms[arm][k]
            assert s["n"] == 3 and len(s["ci"]) == 2, (arm, k)
    assert sorted(data["seam_curve"], key=int) == ["0", "1", "2", "3", "4"]
    assert arms["floor_incremental"]["kl_mean"]["mean"] < 1e-6
    assert arms["floor_bf16"]["kl_mean"]["mean"] > arms["floor_incremental"]["kl_mean"]["mean"]
    assert data["agent"]["n_turns"] == 10
    ks = data["keystone"]
    assert ks["n_cases"] + ks["skipped"] == 3 * len(ce.KEYSTONE_EDITS)
    for arm in ("recomputed", "transplanted"):
        for m in ("stale",) + ce.KEYSTONE_MODES:
            assert f"{arm}/{m}" in ks["arms"]
    assert ks["n_cases"] == 9 and ks["skipped"] == 0
    assert ks["arms"]["recomputed/in_place"]["kl"]["n"] == 9
    assert "Keystone" in html
    assert data["best_mode_by_kl_mean"] in MODES
    assert "scenario" not in data  # the built-in suite: compose.json as without --scenario


@pytest.mark.slow
def test_smollm2_skill_beats_controls():
    model = nk.load("smollm2-135m")
    fid = ce.fidelity(model, None, pairs=[(0, "refunds"), (3, "escalation"), (4, "access")], seams=[0])
    arms = fid["arms"]
    assert arms["prefix"]["kl_mean"]["mean"] < arms["unrotated"]["kl_mean"]["mean"]
    assert arms["prefix"]["kl_mean"]["mean"] < arms["no_skill"]["kl_mean"]["mean"]
    assert arms["floor_incremental"]["kl_mean"]["mean"] < 1e-6


@pytest.mark.slow
def test_smollm2_agent_ten_turns():
    model = nk.load("smollm2-135m")
    r = ce.agent(model, Skill.compile(model, ce.SKILLS["refunds"], name="refunds"), turns=ce.AGENT_TURNS[:10])
    assert r["n_turns"] == 10
    assert r["agreement"]["rate"] >= 0.7


LOAN = """name = "loan"
kind = "gate"
field = "credit_status"
positive_values = ["active"]
negative_values = ["frozen", "closed"]
answers = { positive = " yes", negative = " no" }
policy = "Loans are granted only if the credit status is active."
shots = 2
example = "Client #{id}: credit_status: {value}. {name} asks for a loan. -> loan{answer}\\n"
query = "Client #{id}: credit_status: {value}. {name} asks for a loan. -> loan"
value_pairs = [["active", "frozen"], ["closed", "active"]]
names = ["Ana", "Ben"]
"""


def test_scenario_suite_takes_skill_prefixes_question_and_edits_from_the_file(tiny, tmp_path):
    path = tmp_path / "loan.toml"
    path.write_text(LOAN)
    suite = ce.scenario_suite(path, n_prefixes=4, n_keystone=1, n_turns=2)
    assert suite.skills == {"loan": "Loans are granted only if the credit status is active.\n"}
    assert suite.answers == (" yes", " no")
    assert [p.split("credit_status: ")[1] for p in suite.prefixes] == ["active.\n", "frozen.\n", "closed.\n",
                                                                        "active.\n"]
    for p, suf in zip(suite.prefixes, suite.suffixes):  # the query holds the record's value, after 2 examples
        value = p.split("credit_status: ")[1][:-2]
        assert f"credit_status: {value}. " in suf.rsplit("\n", 1)[1] and suf.count("-> loan") == 3
    assert suite.keystone_edits == (("active", "frozen"), ("closed", "active"))
    assert suite.keystone_field == "credit_status" and suite.keystone_contexts[0][2].endswith("-> loan")
    r = ce.evaluate("tiny-llama", dtype_floor=False, model=tiny, suite=suite)
    assert r["scenario"]["name"] == "loan" and r["scenario"]["source"] == str(path)
    assert r["fidelity"]["n_pairs"] == 4 and r["agent"]["n_turns"] == 2
    assert r["fidelity"]["answer_tokens"] == list(ce.answer_ids(tiny, (" yes", " no"))) != list(ce.answer_ids(tiny))
    ks = r["keystone"]
    assert ks["n_cases"] == 2 and ks["skipped"] == 0 and {row["new"] for row in ks["rows"]} == {"frozen", "active"}
    # a new value of another token count is skipped with the reason, not raised
    odd = ce.keystone(tiny, contexts=suite.keystone_contexts, field="credit_status", edits=(("active", "approved"),),
                      answers=suite.answers)
    assert odd["n_cases"] == 0 and odd["skipped"] == 1 and "tokens" in odd["skip_reasons"][0]


@pytest.mark.slow
def test_eval_compose_cli_runs_a_scenario_file(tmp_path):
    from notekv_cli import main

    path = tmp_path / "loan.toml"
    path.write_text(LOAN)
    out = tmp_path / "out"
    assert main(["eval-compose", "--model", "smollm2-135m", "--scenario", str(path), "--out", str(out),
                 "--pairs", "2", "--turns", "2", "--keystone", "1", "--no-bf16"]) == 0
    data = json.loads((out / "compose.json").read_text())
    assert data["scenario"]["name"] == "loan" and data["scenario"]["source"] == str(path)
    assert data["scenario"]["field"] == "credit_status" and data["scenario"]["answers"] == [" yes", " no"]
    assert data["fidelity"]["n_pairs"] == 2 and data["agent"]["n_turns"] == 2
    assert data["keystone"]["n_cases"] + data["keystone"]["skipped"] == 2
    assert data["fidelity"]["arms"]["floor_incremental"]["kl_mean"]["mean"] < 1e-6
    assert "scenario loan" in (out / "index.html").read_text()


BAD_SCENARIOS = [
    ('name = "x"\nkind = "gate"\n', "missing key"),
    (LOAN.replace('kind = "gate"', 'kind = "readback"'), "kind 'readback'"),
    (LOAN.replace("shots = 2", "shots = 2\nwindow = 3"), "unknown key"),
    (LOAN.replace('field = "credit_status"', 'field = "credit-status"'), "key 'field'"),
    (LOAN.replace("{name} asks for a loan. -> loan\"", "{name} asks for a loan: {value}\""), "key 'query'"),
    ("name = [", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD_SCENARIOS, ids=[m for _, m in BAD_SCENARIOS])
def test_eval_compose_cli_refuses_a_bad_scenario_file_in_one_line(text, message, tmp_path, capsys, monkeypatch):
    from notekv_cli import main

    monkeypatch.setattr(nk, "load", lambda *a, **k: pytest.fail("a model was loaded before the scenario was checked"))
    path = tmp_path / "mine.toml"
    path.write_text(text)
    try:
        code = main(["eval-compose", "--scenario", str(path), "--out", str(tmp_path / "out")])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err and message in err, err
