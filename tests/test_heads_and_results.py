"""Per-head patching (a layer x head result), one result type for exact patching and
attribution, the version flag, and progress bars that stay out of logs."""

import io
import json
import textwrap
import warnings

import pytest
import torch

import notekv as nk
from conftest import TINY_TOML, tiny_model
from notekv.sweep import HeadSweep, Result, Sweep

OLD = "#1 status: good. go -> Y\n#2 status: lost. go -> N\n#3 status: good. go ->"
NEW = OLD[: -len("good. go ->")] + "lost. go ->"


def _answers(m):
    return m.token_id("Y"), m.token_id("N")


def _score(m, run) -> float:
    good, bad = _answers(m)
    return float(run.logits[0, -1, good] - run.logits[0, -1, bad])


# ---------------------------------------------------------------------- per-head patching
@pytest.mark.parametrize("site", ["attn.z", "attn.k"])
def test_head_patching_equals_one_hooked_forward_per_head(site):
    """One (layer, head) per batch row of the runner, at every slot from the first difference,
    on a GQA model (4 query heads, 2 KV heads): each cell is the single hooked forward."""
    m = tiny_model("llama")
    assert m.spec.n_heads == 4 and m.spec.n_kv_heads == 2
    hs = nk.patch_sweep(m, OLD, NEW, answers=_answers(m), site=site, block=5, progress=False)
    n_heads = m.spec.n_heads if site == "attn.z" else m.spec.n_kv_heads
    assert isinstance(hs, HeadSweep) and isinstance(hs, Result)
    assert hs.values.shape == (m.spec.n_layers, n_heads) and hs.heads == list(range(n_heads))
    d = hs.meta["first_diff"]
    assert hs.slots == list(range(d, len(m.tokenize(OLD)))) and hs.meta["method"] == "exact"
    clean = m.run(NEW, collect=[f"L{l}.{site}" for l in hs.layers])
    for l in hs.layers:
        for h in hs.heads:
            one = m.run(OLD, interventions=[nk.Patch(f"L{l}.{site}.h{h}", clean, at=nk.Pos(hs.slots))], logits="last")
            assert abs(_score(m, one) - float(hs.values[l, h])) < 1e-5, (l, h)
    assert hs.m_old == pytest.approx(_score(m, m.run(OLD)), abs=1e-5)
    # the result: recovery, top, JSON and TransformerLens's head heatmap
    torch.testing.assert_close(hs.recovery, (hs.values - hs.m_old) / (hs.m_new - hs.m_old))
    (l, h, r), = hs.top(1)
    assert r == pytest.approx(float(hs.recovery.max())) and float(hs.recovery[l, h]) == pytest.approx(r)
    doc = json.loads(json.dumps(hs.to_json()))
    assert doc["heads"] == hs.heads and len(doc["recovery"]) == m.spec.n_layers and doc["site"] == site
    heat = hs.figure().data[0]
    assert heat.type == "heatmap" and heat.colorscale[0][1] == "rgb(103,0,31)" and heat.zmid == 0  # RdBu
    assert list(heat.x) == hs.heads and list(heat.y) == hs.layers
    # at the decision token only, and one head's layer x slot map
    last = nk.patch_sweep(m, OLD, NEW, answers=_answers(m), site=site, slots=nk.Last(), progress=False)
    assert last.slots == [len(m.tokenize(OLD)) - 1]
    for l, h in [(0, 0), (2, n_heads - 1)]:  # these rows run from the last token, over OLD's cache before it
        one = m.run(OLD, interventions=[nk.Patch(f"L{l}.{site}.h{h}", clean, at=nk.Last())], logits="last")
        assert abs(_score(m, one) - float(last.values[l, h])) < 1e-5, (l, h)
    one = nk.patch_sweep(m, OLD, NEW, answers=_answers(m), site=f"{site}.h1", layers=[2], progress=False)
    assert isinstance(one, Sweep) and one.values.shape == (1, len(m.tokenize(OLD)))
    p = one.slots[-1]
    ref = m.run(OLD, interventions=[nk.Patch(f"L2.{site}.h1", clean, at=nk.Pos(p))], logits="last")
    assert abs(_score(m, ref) - float(one.values[0, -1])) < 1e-5
    with pytest.raises(nk.InputError, match=f"{site}.h{n_heads - 1}"):
        nk.patch_sweep(m, OLD, NEW, answers=_answers(m), site=f"{site}.h{n_heads}", progress=False)


def test_head_patching_is_transformerlens_all_positions_head_patching():
    """The default slots (from the first difference on) give TransformerLens's own
    ``get_act_patch_attn_head_out_all_pos``, run on its bridge of the same model."""
    patching = pytest.importorskip("transformer_lens.patching")
    from notekv.backends.tl import TLBackend

    m = tiny_model("llama")
    good, bad = _answers(m)
    bridge = TLBackend(m).bridge
    _, cache = bridge.run_with_cache(torch.tensor([m.tokenize(NEW).ids]))
    theirs = patching.get_act_patch_attn_head_out_all_pos(
        bridge, torch.tensor([m.tokenize(OLD).ids]), cache, lambda lg: lg[0, -1, good] - lg[0, -1, bad])
    ours = nk.patch_sweep(m, OLD, NEW, answers=(good, bad), site="attn.z", progress=False)
    torch.testing.assert_close(ours.values, theirs.to(ours.values), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- one result type
def test_attribution_returns_the_results_exact_patching_returns():
    m = tiny_model("llama")
    ans = _answers(m)
    att = nk.attribute_acts(m, OLD, NEW, answers=ans, sites=("resid_pre", "attn.z"))
    assert isinstance(att["resid_pre"], Sweep) and isinstance(att["attn.z"], HeadSweep)
    exact = {"resid_pre": nk.patch_sweep(m, OLD, NEW, answers=ans, progress=False),
             "attn.z": nk.patch_sweep(m, OLD, NEW, answers=ans, site="attn.z", progress=False)}
    assert list(att) == ["resid_pre", "attn.z"]
    for site, ex in exact.items():
        est = att[site]
        assert type(est) is type(ex) and est.meta["method"] == "attribution" and ex.meta["method"] == "exact"
        assert est.values.shape == ex.values.shape and est.m_old == pytest.approx(ex.m_old, abs=1e-5)
        assert set(est.to_json()) == set(ex.to_json())
        assert est.recovery.shape == ex.recovery.shape and len(est.top(3)) == 3
        est.figure()
    # the head result estimates the exact head patching (this pair is close to linear)
    z, zx = att["attn.z"], exact["attn.z"]
    assert z.slots == zx.slots and z.heads == zx.heads
    torch.testing.assert_close(z.values - z.m_old, zx.values - zx.m_old, atol=2e-3, rtol=0.1)
    assert att.result("attn.z", slots=nk.Last()).slots == [len(m.tokenize(OLD)) - 1]
    assert att.sweep("attn.z", head=3).values.shape == (m.spec.n_layers, len(m.tokenize(OLD)))
    json.dumps(att.to_json())
    # KV attribution is the same kind of result
    assert isinstance(nk.kv_attribution(m, OLD, NEW, answers=ans), Result)
    # what attribute_acts users read before still works, with a deprecation warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = att.maps["attn.z"]
    assert raw.shape == (m.spec.n_layers, m.spec.n_heads, len(m.tokenize(OLD)))
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    torch.testing.assert_close(raw, att.estimate("attn.z"))
    with pytest.raises(nk.InputError, match="sites="):
        att.estimate("attn_out")


# ---------------------------------------------------------------------- the command line
def test_version_flag_prints_the_version(capsys):
    from notekv_cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"notekv {nk.__version__}"


BAR_MARKS = ("\r", "\x1b[", "it/s", "%|", "s/it")


def test_progress_bars_stay_out_of_output_that_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    from notekv_cli import main

    m = tiny_model("llama")
    monkeypatch.setattr(nk, "load", lambda *a, **k: m)
    toml = tmp_path / "tiny_gate.toml"
    toml.write_text(TINY_TOML + textwrap.dedent('''
        [edit]
        line = "User"
        cue = "Go:"
        shots = 1
        requests = ["Let me in."]
    '''))
    code = main(["eval-edits", "--scenario", str(toml), "--out", str(tmp_path / "out"), "--cases", "1",
                 "--max-candidates", "1", "--min-swing", "-1000"])
    nk.patch_sweep(m, OLD, NEW, answers=_answers(m), progress=True)
    nk.patch_sweep(m, OLD, NEW, answers=_answers(m), site="attn_out", progress=True)
    nk.attribute_acts(m, OLD, NEW, answers=_answers(m), sites=("resid_pre",), graddrop=True, progress=True)
    got = capsys.readouterr()
    assert code == 0 and "wrote" in got.out
    for mark in BAR_MARKS:
        assert mark not in got.err and mark not in got.out, (mark, got.err[-300:])

    from notekv.runner import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    for _ in progress_bar(range(3), progress=True, desc="cells", file=term):
        pass
    assert "cells" in term.getvalue() and "\r" in term.getvalue()  # on a terminal it is drawn
    quiet = Terminal()
    for _ in progress_bar(range(3), progress=False, desc="cells", file=quiet):
        pass
    assert quiet.getvalue() == ""
