"""The one-plan hook layer: site map, plans, per-row locations, KVCache as the KV currency,
TransformerLens habits (collect="all", globs), one selector frame, and sweeps from text."""

import json

import pytest
import torch

import notekv as nk
from conftest import tiny_model

TEXT = "order_status: shipped. Refund request: granted"
OLD = "order_status: shipped. Refund?"
NEW = "order_status: stopped. Refund?"  # the same token count as OLD on every tokenizer here


# ---------------------------------------------------------------- KVPatch honours heads and which
@pytest.mark.parametrize("which", ["k", "v"])
def test_kv_patch_honours_heads_and_which(which):
    model = tiny_model("llama")  # 2 KV heads
    src, plain = model.run(NEW), model.run(OLD)
    slots = [i for i, (a, b) in enumerate(zip(src.ids[0], plain.ids[0])) if a != b][:2]
    got = model.run(OLD, interventions=[nk.KVPatch(src, at=nk.Pos(slots), layers=[0], heads=[1], which=which)]).kv
    patched, kept = (got.keys, got.values) if which == "k" else (got.values, got.keys)
    s_patched = src.kv.keys if which == "k" else src.kv.values
    p_patched = plain.kv.keys if which == "k" else plain.kv.values
    p_kept = plain.kv.values if which == "k" else plain.kv.keys
    # layer 0 is computed from the embeddings alone, so only the patch itself can differ there
    assert torch.equal(patched[0, :, 1, slots], s_patched[0, :, 1, slots])
    assert not torch.equal(s_patched[0, :, 1, slots], p_patched[0, :, 1, slots])
    assert torch.equal(patched[0, :, 0], p_patched[0, :, 0])  # the other head untouched
    other = [i for i in range(len(plain.kv)) if i not in slots]
    assert torch.equal(patched[0, :, 1, other], p_patched[0, :, 1, other])  # other slots untouched
    assert torch.equal(kept[0], p_kept[0])  # the other of K/V untouched


def test_kv_patch_accepts_a_kvcache_and_a_run_alike():
    model = tiny_model("llama")
    old_p, new_p = model.run(OLD[:-1]), model.run(NEW[:-1])
    last = model.tokenize(OLD).ids[-1]
    by_run = model.run([last], past=old_p, interventions=[nk.KVPatch(new_p)])
    by_cache = model.run([last], past=old_p.kv, interventions=[nk.KVPatch(new_p.kv)])
    assert isinstance(new_p.kv, nk.KVCache) and new_p.kv.token_ids.tolist() == list(new_p.ids[0])
    assert torch.equal(by_run.logits, by_cache.logits)
    full = model.run(model.tokenize(NEW).ids)
    assert torch.allclose(by_run.logits[0, -1], full.logits[0, -1], atol=1e-5)


def test_patch_from_a_kvcache_at_attn_k():
    model = tiny_model("llama")
    src = model.run(NEW)
    a = model.run(OLD, interventions=[nk.Patch("L1.attn.k", src.kv, at=nk.Pos(2))])
    b = model.run(OLD, interventions=[nk.Patch("L1.attn.k", src, at=nk.Pos(2))])
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.kv.keys[1, :, :, 2], src.kv.keys[1, :, :, 2])


def test_run_kv_positions_and_tokens_follow_past_and_offsets():
    model = tiny_model("llama")
    head = model.run("status: ok.", positions=5)
    assert head.kv.positions.tolist() == list(range(5, 5 + len(head.kv)))
    cont = model.run(" Refund?", past=head)
    n = len(head.kv)
    assert cont.kv.token_ids[:n].tolist() == head.kv.token_ids.tolist()
    assert cont.kv.positions[n:].tolist() == list(range(n + 5, len(cont.kv) + 5))  # after the cache's last position
    assert cont.start == n and cont.kv.check_model(model) is None


# ---------------------------------------------------------------- per-row locations
def test_per_row_patch_equals_single_runs():
    model = tiny_model("qwen3")
    src = model.run(NEW, collect=["L1.resid_pre", "L0.attn.z"])
    rows = [nk.Pos(2), nk.Pos(4, 5), nk.Pos()]
    batch = model.run([OLD] * 3, interventions=[nk.Patch("L1.resid_pre", src, at=nk.PerRow(rows)),
                                                nk.Patch("L0.attn.z.h1", src, at=nk.PerRow(rows[::-1]))])
    for b, (r, r2) in enumerate(zip(rows, rows[::-1])):
        single = model.run(OLD, interventions=[nk.Patch("L1.resid_pre", src, at=r), nk.Patch("L0.attn.z.h1", src, at=r2)])
        assert torch.allclose(batch.logits[b], single.logits[0], atol=1e-5)
    assert torch.allclose(batch.logits[2], model.run(OLD, interventions=[
        nk.Patch("L0.attn.z.h1", src, at=nk.Pos(2))]).logits[0], atol=1e-5)


def test_per_row_kv_patch_and_steer_equal_single_runs():
    model = tiny_model("gemma3_text")
    old_p, new_p = model.run(OLD[:-1]), model.run(NEW[:-1])
    last = [model.tokenize(OLD).ids[-1]]
    rows = nk.PerRow(nk.Pos(1), nk.Pos(3, 4))
    vec = torch.randn(2, model.spec.d_model)
    batch = model.run([last, last], past=old_p.kv.expand(2),
                      interventions=[nk.KVPatch(new_p.kv, at=rows, layers=[0, 1]), nk.Steer("L1.resid_pre", vec)])
    for b, at in enumerate(rows.rows):
        single = model.run(last, past=old_p, interventions=[nk.KVPatch(new_p.kv, at=at, layers=[0, 1]),
                                                             nk.Steer("L1.resid_pre", vec[b])])
        assert torch.allclose(batch.logits[b], single.logits[0], atol=1e-5)


def test_per_row_needs_one_selector_per_row():
    model = tiny_model("llama")
    src = model.run(NEW, collect=["L1.resid_pre"])
    with pytest.raises(nk.PlanError, match="PerRow has 2 rows but the forward has 3"):
        model.run([OLD] * 3, interventions=[nk.Patch("L1.resid_pre", src, at=nk.PerRow(nk.Pos(1), nk.Pos(2)))])
    with pytest.raises(nk.PlanError, match="PerRow"):
        model.run(OLD, collect=[], interventions=[nk.Collect("L1.resid_pre", at=nk.PerRow(nk.Pos(1)))])


def test_per_row_knockout_dst():
    model = tiny_model("llama")
    n = len(model.tokenize(OLD))
    ko = nk.Knockout(src=nk.Range(1, n), dst=nk.PerRow(nk.Last(), nk.Pos()), layers="all")
    batch = model.run([OLD, OLD], interventions=[ko])
    alone = model.run(OLD, interventions=[nk.Knockout(src=nk.Range(1, n), dst=nk.Last(), layers="all")])
    assert torch.allclose(batch.logits[0], alone.logits[0], atol=1e-5)
    assert torch.allclose(batch.logits[1], model.run(OLD).logits[0], atol=1e-5)


# ---------------------------------------------------------------- TransformerLens habits
def test_collect_all_equals_per_site_collection():
    model = tiny_model("gemma3_text")
    everything = model.run(TEXT, collect="all")
    names = model.sitemap.names()
    assert set(everything.acts) == {n for n in names if ".kv." not in n}
    for key in ("embed", "L0.attn.pattern", "L1.attn.q", "L1.resid_mid", "L1.attn.k_pre", "logits"):
        alone = model.run(TEXT, collect=[key])
        assert torch.allclose(everything[key], alone[key], atol=1e-5), key  # eager vs SDPA rounding
    assert torch.allclose(everything.logits, model.run(TEXT).logits, atol=1e-5)


def test_collect_globs_and_collect_inside_interventions():
    model = tiny_model("llama")
    pats = model.run(TEXT, collect="L*.attn.pattern")
    assert sorted(pats.acts) == [f"L{l}.attn.pattern" for l in range(model.spec.n_layers)]
    tl = model.run(TEXT, collect="blocks.*.hook_resid_pre")
    assert sorted(tl.acts) == [f"L{l}.resid_pre" for l in range(model.spec.n_layers)]
    inside = model.run(TEXT, interventions=[nk.Collect("L1.resid_post", at=nk.Last())])
    assert torch.equal(inside["L1.resid_post"], tl_full := model.run(TEXT, collect=["L1.resid_post"])["L1.resid_post"][:, -1:])
    assert tl_full.shape[1] == 1
    with pytest.raises(nk.SiteError, match="matches no site"):
        model.run(TEXT, collect="L*.nothing")


def test_selectors_share_one_absolute_frame():
    model = tiny_model("llama")
    view = model.tokenize(" refund please", start=10)
    assert nk.Last().resolve(view) == nk.Pos(-1).resolve(view) == [10 + len(view) - 1]
    assert nk.Range(-2).resolve(view) == [10 + len(view) - 2, 10 + len(view) - 1]
    assert nk.Span("please").resolve(view)[0] >= 10
    assert nk.resolve(nk.PerRow(nk.Last(), nk.Pos(3)), view) == ([10 + len(view) - 1], [3])


def test_plan_is_inspectable_and_knows_the_route():
    model = tiny_model("gpt_neox")
    plan = model.plan(nk.Patch("L1.attn.q_pre", torch.zeros(1), at=nk.Last()), nk.KVPatch(model.run("hi"), layers=[0]))
    assert [str(s.site) for s in plan.steps] == ["L1.attn.q_pre", "L0.kv.k", "L0.kv.v"]
    assert plan.steps[0].route.access("native").layout == "fused0" and plan.steps[1].route.access("native").kind == "cache_full"
    assert "Patch(at=Last())" in repr(plan)
    with pytest.raises(NotImplementedError, match="KVPatch.*TransformerLens"):
        nk.hooks.compile_plan(model, [nk.KVPatch(model.run("hi"))], executor="tl")


def test_interventions_validate_layers_and_heads():
    model = tiny_model("llama")
    with pytest.raises(nk.SiteError, match="KV heads"):
        model.run(OLD, interventions=[nk.KVPatch(model.run(NEW), heads=[5])])
    with pytest.raises(nk.SiteError, match="layer 7"):
        model.run(OLD, interventions=[nk.Knockout(src=nk.Pos(1), dst=nk.Last(), layers=[7])])
    with pytest.raises(nk.PlanError, match="return a tensor"):
        model.run(OLD, interventions=[nk.Hook("L0.resid_pre", lambda t, hook: 3)])


# ---------------------------------------------------------------- sweeps from text
def test_patch_sweep_from_text_matches_single_patches():
    model = tiny_model("llama")
    good, bad = 300 - 41, 300 - 42  # any two ids of the tiny vocabulary
    good, bad = min(good, model.spec.vocab_size - 1), min(bad, model.spec.vocab_size - 2)
    sw = nk.patch_sweep(model, OLD, NEW, answers=(good, bad), progress=False)
    hooks = nk.patch_sweep(model, OLD, NEW, answers=(good, bad), method="hooks", progress=False)
    assert torch.allclose(sw.values, hooks.values, atol=1e-4)
    assert sw.values.shape == (model.spec.n_layers, len(model.tokenize(OLD)))
    d = sw.meta["first_diff"]
    full = model.run(NEW, collect=["L1.resid_pre"])
    one = model.run(OLD, interventions=[nk.Patch("L1.resid_pre", full, at=nk.Pos(d))], logits="last").logits[0, -1]
    assert abs(float(one[good] - one[bad]) - float(sw.values[1, d])) < 1e-4
    assert torch.all(sw.recovery[:, :d] == 0)  # before the first difference nothing moves
    new_logits = model.run(NEW, logits="last").logits[0, -1]
    assert abs(sw.m_new - float(new_logits[good] - new_logits[bad])) < 1e-5
    doc = json.loads(json.dumps(sw.to_json()))
    assert doc["slots"][d] == d and len(doc["recovery"]) == model.spec.n_layers
    assert sw.figure().data[0].type == "heatmap"


@pytest.mark.parametrize("site", ["kv", "attn_out"])
def test_patch_sweep_cells_equal_single_interventions(site):
    model = tiny_model("qwen3")
    metric = lambda lg: lg[:, 5] - lg[:, 7]  # noqa: E731
    sw = nk.patch_sweep(model, OLD, NEW, metric=metric, site=site, layers=[1, 0], block=3, progress=False)
    d = sw.meta["first_diff"]
    ids = model.tokenize(OLD).ids
    for li, l in enumerate([1, 0]):
        for p in (d, len(sw.slots) - 1):
            if site == "kv":
                new_p = model.run(model.tokenize(NEW).ids[:-1])
                out = model.run([ids[-1]], past=model.run(ids[:-1]), interventions=[nk.KVPatch(new_p, at=p, layers=[l])])
            else:
                src = model.run(NEW, collect=[f"L{l}.attn_out"])
                out = model.run(OLD, interventions=[nk.Patch(f"L{l}.attn_out", src, at=p)])
            assert abs(float(metric(out.logits[:, -1])[0]) - float(sw.values[li, p])) < 1e-4, (l, p)
    assert torch.all(sw.values[:, :d] == sw.m_old)  # before the first difference nothing moves


def test_patch_sweep_refuses_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="equal token length"):
        nk.patch_sweep(model, OLD, NEW + " more words", answers=(1, 2))
    with pytest.raises(ValueError, match="exactly one"):
        nk.patch_sweep(model, OLD, NEW)
    with pytest.raises(IndexError, match="slot 99"):
        nk.patch_sweep(model, OLD, NEW, answers=(1, 2), slots=[99])
    with pytest.raises(ValueError, match="site="):
        nk.patch_sweep(model, OLD, NEW, answers=(1, 2), site="attn.pattern")


def test_compose_takes_a_run_as_its_prefix():
    model = tiny_model("llama")
    skill = nk.Skill.compile(model, "Refunds within 30 days.\n", name="policy")
    head = model.run("Customer record.\n")
    by_run = nk.compose(model, head, [skill], "Refund?", engine="hf")
    by_cache = nk.compose(model, head.kv, [skill], "Refund?", engine="hf")
    assert torch.equal(by_run.logits, by_cache.logits)


# ---------------------------------------------------------------- the backends run the same plan
@pytest.mark.parametrize("kind", ["tl", "nnsight"])
def test_backends_execute_per_row_plans_like_the_native_layer(kind):
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    from notekv.backends.nnsight import NNsightBackend
    from notekv.backends.tl import TLBackend

    model = nk.tiny("qwen3")
    model.hf.config._attn_implementation = "eager"  # the bridge computes eager attention
    backend = (TLBackend if kind == "tl" else NNsightBackend)(model)
    src = model.run(NEW, collect=["L1.resid_pre", "L0.attn.z"])
    vec = torch.randn(2, model.spec.d_model)
    ivs = [nk.Patch("L1.resid_pre", src, at=nk.PerRow(nk.Pos(2), nk.Pos(4, 5))),
           nk.Patch("L0.attn.z.h1", src, at=nk.PerRow(nk.Last(), nk.Pos())),
           nk.Steer("L1.mlp_out", vec, at=nk.Last()), nk.Collect("L1.attn.v")]
    native = model.run([OLD, OLD], interventions=ivs)
    other = backend.run([OLD, OLD], interventions=ivs)
    assert (native.logits - other.logits).abs().max() <= 1e-5
    assert (native["L1.attn.v"] - other["L1.attn.v"]).abs().max() <= 1e-5
    assert not torch.allclose(native.logits[0], native.logits[1], atol=1e-4)  # rows really differ
