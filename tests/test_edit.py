"""EditableContext: modes, exactness, immutability, errors, and the edit evaluation."""

from __future__ import annotations

import json

import pytest
import torch

import notekv as nk
from notekv.edit import EditableContext, EditError, Field
from notekv.edit.document import render
from notekv.edit.score import decide
from notekv.hooks.positions import TokenView

from tests.conftest import tiny_model

TEMPLATE = ("agent: {agent}\nRule: allow only if status is ok.\nstatus: {status}\nNote: please check the "
            "request now.\nname: {name}\nEnd of record.\n")
FIELDS = {"agent": "Ann", "status": "ok", "name": "bob"}
CUE, CHOICES = "Decision:", ["yes", "no"]
ALL_MODES = ["stale", "in_place", "erratum", "field+erratum", "hoist", "full", "auto",
             "selective@3:attention:faithful", "selective@3:deviation:faithful", "selective@3:random:faithful",
             "selective@3:attention:oracle", "selective@3:deviation:oracle", "selective@3:random:oracle"]


def ctx_of(arch: str = "llama", **kw) -> EditableContext:
    return EditableContext(tiny_model(arch), TEMPLATE, FIELDS, cue=CUE, choices=CHOICES, **kw).prefill()


def kl(a, b) -> float:
    return b.kl_from(a)


def snapshot(cache):
    return [t.clone() for t in (cache.keys, cache.values, cache.positions, cache.token_ids)]


def same(cache, snap) -> bool:
    return all(torch.equal(a, b) for a, b in zip((cache.keys, cache.values, cache.positions, cache.token_ids), snap))


# ---------------------------------------------------------------------- acceptance
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_in_place_plus_recompute_downstream_equals_full(arch):
    ctx = ctx_of(arch)
    ip = ctx.edit("status", "no", "in_place")
    n_down = len(ip.cache) - 1 - max(ip.layout.field_slots("status"))
    every = ctx.edit("status", "no", f"selective@{n_down}:random:faithful")
    full = ctx.edit("status", "no", "full")
    fresh = nk.KVCache.prefill(ctx.model, full.layout.text)
    d_every, d_full = every.decide(), full.decide()
    d_fresh = decide(ctx.model, fresh, CUE, CHOICES)
    assert kl(d_full, d_every) < 1e-6
    assert kl(d_fresh, d_full) < 1e-6  # full (prefix reuse) equals a fresh prefill of the new text
    assert torch.allclose(every.cache.keys, fresh.keys, atol=1e-5)
    assert every.clean == len(every.layout)
    assert not torch.allclose(ip.cache.keys, fresh.keys, atol=1e-5)  # in_place alone leaves the downstream stale


def test_stale_equals_prefill_of_old_value_exactly():
    ctx = ctx_of()
    st = ctx.edit("status", "no", "stale")
    ref = nk.KVCache.prefill(ctx.model, ctx.layout.text)
    assert torch.equal(st.cache.keys, ref.keys) and torch.equal(st.cache.values, ref.values)
    assert st.values["status"] == "no" and st.doc_values["status"] == "ok" and st.stale_fields == ["status"]
    assert st.cost.tokens == 0


def test_in_place_chain_equals_direct():
    ctx = ctx_of()
    abc = ctx.edit("status", "no", "in_place").edit("status", "hi", "in_place")
    ac = ctx.edit("status", "hi", "in_place")
    assert torch.equal(abc.cache.keys, ac.cache.keys) and torch.equal(abc.cache.values, ac.cache.values)
    assert torch.equal(abc.cache.token_ids, ac.cache.token_ids)
    back = ctx.edit("status", "no", "in_place").edit("status", "ok", "in_place")
    assert torch.allclose(back.cache.keys, ctx.cache.keys, atol=1e-5)  # A -> B -> A: the original up to float noise


def test_shared_cache_bitwise_unchanged_after_any_edits():
    ctx = ctx_of()
    snap = snapshot(ctx.cache)
    st = ctx.state
    for mode in ALL_MODES:
        s = ctx.edit("status", "no", mode)
        s.decide()
        s.fidelity()
        st = st.edit("name", "amy" if st.values["name"] != "amy" else "bob", mode)
    st.edit("agent", "Bob", "field+erratum").edit("status", "no", "selective@2").decide()
    st.generate(max_new_tokens=3)
    ctx.edit("status", "nope", "auto")
    assert same(ctx.cache, snap)
    assert same(ctx.state.cache, snap)


# ---------------------------------------------------------------------- modes
def test_modes_cost_and_state():
    ctx = ctx_of()
    field = ctx.layout.field_slots("status")
    ip = ctx.edit("status", "no", "in_place")
    assert ip.cost.tokens == len(field) and not ip.cost.needs_full
    assert ip.clean == max(field) + 1 and ip.doc_values["status"] == "no"
    full = ctx.edit("status", "no", "full")
    assert full.cost.tokens == len(full.layout) - min(field) and full.cost.needs_full
    assert full.cost.flops == pytest.approx(2 * nk.edit.score.non_embedding_params(ctx.model) * full.cost.tokens)
    er = ctx.edit("status", "no", "erratum")
    assert er.appended[0][0] == "erratum" and "[STATE UPDATE] status has changed to no;" in er.appended[0][1]
    assert er.doc_values["status"] == "ok" and len(er.cache) == len(ctx.cache) + er.cost.tokens
    fe = ctx.edit("status", "no", "field+erratum")
    assert fe.cost.tokens == len(field) + er.cost.tokens
    assert torch.equal(fe.cache.keys[..., : len(ctx.cache), :], ip.cache.keys)
    ho = ctx.edit("status", "no", "hoist")
    assert ho.appended[0][1] == "status: no\n"
    custom = ctx.edit("status", "no", "erratum", template="NOTE {field}: {old} -> {value}")
    assert custom.appended[0][1] == "NOTE status: ok -> no\n"
    orc = ctx.edit("status", "no", "selective@3:attention:oracle")
    assert orc.cost.needs_full and any("upper bound" in d for d in orc.cost.detail)
    fa = ctx.edit("status", "no", "selective@3:deviation:faithful")
    assert not fa.cost.needs_full and any("selected slots" in d for d in fa.cost.detail)
    assert fa.cost.wall_s > 0 and len(fa.selection["chosen"]) == 3
    assert all(s > max(field) for s in fa.selection["chosen"])
    again = ctx.edit("status", "no", "selective@3:deviation:faithful", ranking=fa.selection)  # ranking reused
    assert again.selection["chosen"] == fa.selection["chosen"] and again.cost.tokens == fa.cost.tokens
    assert torch.equal(again.cache.keys, fa.cache.keys)
    with pytest.raises(EditError, match="ranking= holds a 'deviation' ranking"):
        ctx.edit("status", "no", "selective@3:random", ranking=fa.selection)


def test_chained_edits_over_several_fields():
    ctx = ctx_of()
    st = ctx.edit("status", "no", "erratum").edit("name", "amy", "in_place").edit("agent", "Bob", "hoist")
    assert st.values == {"agent": "Bob", "status": "no", "name": "amy"}
    assert st.doc_values == {"agent": "Ann", "status": "ok", "name": "amy"}
    assert [a[0] for a in st.appended] == ["erratum", "hoist"] and len(st.history) == 3
    full = st.edit("status", "no", "full")  # full re-renders every current value and drops appended lines
    ref = ctx.reference({"agent": "Bob", "status": "no", "name": "amy"})
    assert full.appended == () and full.stale_fields == []
    assert kl(ref.decide(), full.decide()) < 1e-6
    fresh = nk.KVCache.prefill(ctx.model, full.layout.text)
    assert torch.allclose(full.cache.keys, fresh.keys, atol=1e-5)


def test_decide_reports_both_variants_and_generate():
    ctx = ctx_of()
    d = ctx.decide()
    assert set(d.logp_space) == set(d.logp_nospace) == {"yes", "no"}
    assert d.space and d.choice in ("yes", "no") and d.agree in (True, False)
    assert d.margin == pytest.approx(d.logp_space["yes"] - d.logp_space["no"])
    assert ctx.decide(space=False).logp is ctx.decide(space=False).logp_nospace
    g = ctx.edit("status", "no", "field+erratum").generate(max_new_tokens=4)
    assert g.new_ids.shape[1] == 4
    f = ctx.edit("status", "no", "full").fidelity()
    assert f["kl"] < 1e-9 and f["agree"]


def test_auto_chooses_and_explains():
    ctx = ctx_of()
    st = ctx.edit("status", "no", "auto")
    assert st.mode == "auto" and st.auto.chosen in ("in_place", "full")
    assert st.auto.reason and "stale" in st.auto.decisions and st.cost.tokens >= len(ctx.layout.field_slots("status"))
    fb = ctx.edit("status", "nope", "auto")  # 4 tokens vs 2: in place impossible -> falls back
    assert fb.auto.chosen == "full" and fb.auto.escalated and "token(s)" in fb.auto.reason
    assert fb.values["status"] == "nope" and fb.stale_fields == []
    assert ctx.edit("status", "ok", "auto").auto.chosen == "stale"


def test_selective_on_sliding_window_caches_longer_than_the_window_is_exact():
    ctx = ctx_of("gemma3_text")  # tiny Gemma-3: window 8, a cache of 100+ slots
    ip = ctx.edit("status", "no", "in_place")
    n_down = len(ip.cache) - 1 - max(ip.layout.field_slots("status"))
    every = ctx.edit("status", "no", f"selective@{n_down}:random:faithful")  # windows measured by position
    fresh = nk.KVCache.prefill(ctx.model, every.layout.text)
    assert len(fresh) > 8 * ctx.model.spec.sliding_window
    assert torch.allclose(every.cache.keys, fresh.keys, atol=1e-5)
    assert torch.allclose(every.cache.values, fresh.values, atol=1e-5)
    assert kl(ctx.edit("status", "no", "full").decide(),
              decide(ctx.model, nk.KVCache.prefill(ctx.model, ctx.render({**FIELDS, "status": "no"}).text), CUE, CHOICES)) < 1e-6


# ---------------------------------------------------------------------- bad input
def test_unknown_field_lists_known_fields():
    ctx = ctx_of()
    with pytest.raises(EditError, match=r"unknown field 'stat'; known fields: \['agent', 'status', 'name'\]"):
        ctx.edit("stat", "no")
    with pytest.raises(EditError, match="unknown field"):
        EditableContext(ctx.model, TEMPLATE, {**FIELDS, "zzz": "1"})
    with pytest.raises(EditError, match="unknown mode 'inplace'"):
        ctx.edit("status", "no", "inplace")
    with pytest.raises(EditError, match=r"mode 'in_place' takes no option\(s\) \['k'\]"):
        ctx.edit("status", "no", "in_place", k=3)


def test_length_changing_in_place_names_both_counts():
    ctx = ctx_of()
    with pytest.raises(EditError, match=r"'nope' is 4 token\(s\).*'ok' is 2 token\(s\)"):
        ctx.edit("status", "nope", "in_place")
    with pytest.raises(EditError, match="token count"):
        ctx.edit("status", "nope", "selective@2")
    assert ctx.edit("status", "nope", "full").values["status"] == "nope"


class _WordTokenizer:
    """Word-level stand-in tokenizer: letters and digits merge into one token, like BPE."""

    def __call__(self, text, return_offsets_mapping=True, add_special_tokens=True):
        import re

        spans = [(m.start(), m.end()) for m in re.finditer(r" ?\w+|\s|[^\w\s]", text)]
        return {"input_ids": [hash(text[a:b]) % 1000 for a, b in spans], "offset_mapping": spans}

    def decode(self, ids):
        return str(ids[0])


class _StubModel:
    def tokenize(self, text, start=0, special=None):
        return TokenView.from_text(_WordTokenizer(), text)


def test_merge_across_boundary_is_refused_with_the_fix():
    stub = _StubModel()
    with pytest.raises(EditError, match=r"field 'status'.*merge.*put a space or newline between \{status\}"):
        render(stub, ("status: ", Field("status"), "ly\n"), {"status": "ok"})
    lay = render(stub, ("status: ", Field("status"), "\n"), {"status": "ok"})
    assert lay.slots["status"] == ((2,),)
    with pytest.raises(EditError, match="empty or blank"):
        render(stub, ("status: ", Field("status"), "\n"), {"status": " "})
    with pytest.raises(EditError, match="not a plain field name"):
        EditableContext(tiny_model("llama"), "a {x:>3} b", {"x": "1"})


def test_field_may_appear_twice():
    m = tiny_model("llama")
    ctx = EditableContext(m, "s={s}; again s={s}.\nok\n", {"s": "ab"}, cue="D:", choices=["y", "n"]).prefill()
    assert len(ctx.layout.slots["s"]) == 2
    st = ctx.edit("s", "cd", "in_place")
    assert st.cost.tokens == 4 and st.doc_values["s"] == "cd"


# ---------------------------------------------------------------------- evaluation
TOY = {"toy": {"policy": "Access is allowed only if the status is active.", "field": "status",
               "positive": ["active"], "negative": ["banned", "frozen"], "line": "User", "cue": "Access:",
               "answers": ("approved", "rejected"), "shots": 2, "requests": ["Let me in.", "User #{id} here."]}}


def test_eval_edits_json_lists_every_mode(tmp_path):
    from evals import edits

    res = edits.evaluate(tiny_model("llama"), None, 2, k=2, min_swing=-1e9, progress=False, suite=TOY,
                         agents=["Ann", "Bob", "Eve"], noise_cases=1)
    out = edits.save(res, tmp_path / "ev")
    doc = json.loads((out / "edits.json").read_text())
    html = (out / "index.html").read_text()
    assert "plotly" in html.lower() and len(html) > 1_000_000  # plotly.js inlined: opens offline
    modes = {r["mode"]: r for r in doc["modes"]}
    assert set(modes) == {m.format(k=2) for m in edits.MODES}
    for r in doc["modes"] + doc["controls"]:
        for key in ("n", "p_correct", "ci", "raw_p_correct", "tokens_recomputed", "token_forwards", "flops", "wall_s",
                    "needs_full_recompute", "kl_full_mean", "p_positive_when_expected_negative"):
            assert key in r, (r["mode"], key)
        assert r["n"] == 2 and len(r["ci"]) == 2
    assert {c["mode"] for c in doc["controls"]} == set(edits.CONTROLS)
    assert modes["stale"]["p_correct"] == 0.0 and modes["full"]["p_correct"] == 1.0
    assert modes["full"]["needs_full_recompute"] and not modes["in_place"]["needs_full_recompute"]
    assert doc["auto"]["n"] == 2 and "precision" in doc["auto"]["raw"] and "recall" in doc["auto"]["calibrated"]
    assert doc["noise_floor"]["n"] == 1 and doc["n_valid"] == 2


def test_cli_registers_eval_edits():
    import argparse

    from notekv_cli import eval_edits

    p = argparse.ArgumentParser()
    eval_edits.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["eval-edits", "--model", "smollm2-135m", "--scenario", "refund", "--out", "x"])
    assert a.fn is eval_edits._cmd_eval_edits and a.cases == 32 and a.scenario == "refund"


# ---------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_in_place_plus_downstream_equals_full(smollm2):
    from evals.edit_cases import make_case

    case = make_case("access", 0)
    ctx = EditableContext(smollm2, case.template, case.fields, cue=case.cue, choices=case.choices).prefill()
    snap = snapshot(ctx.cache)
    ip = ctx.edit(case.field, case.new, "in_place")
    n_down = len(ip.cache) - 1 - max(ip.layout.field_slots(case.field))
    every = ctx.edit(case.field, case.new, f"selective@{n_down}:random:faithful")
    full = ctx.edit(case.field, case.new, "full")
    assert kl(full.decide(), every.decide()) < 1e-6
    assert ctx.edit(case.field, case.new, "field+erratum").decide().choice in case.choices
    assert same(ctx.cache, snap)


@pytest.mark.slow
def test_smollm2_refuses_a_merging_field(smollm2):
    with pytest.raises(EditError, match="field 'adj'.*merge"):
        EditableContext(smollm2, "It was pure {adj}ness today.\n", {"adj": "happi"})
    with pytest.raises(EditError, match=r"is 3 token\(s\).*is 1 token\(s\)"):
        EditableContext(smollm2, "status: {s}\n", {"s": "delivered"}).prefill().edit("s", "undelivered", "in_place")
