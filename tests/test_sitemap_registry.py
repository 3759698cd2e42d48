"""The open site map (executors register their routes; the support table and TransformerLens
names come from it), the one attention arithmetic, the one early stop, and the error classes
of the hook floor."""

from __future__ import annotations

import pytest
import torch

import notekv as nk
from conftest import tiny_model
from notekv.hooks import sitemap
from notekv.hooks.sitemap import Access, Unsupported, UnsupportedError
from notekv.hooks.sites import LAYER_SITES


# ---------------------------------------------------------------- registration
def test_a_new_executor_is_one_registration():
    model = tiny_model("llama")
    model.sitemap.route(nk.site("L0.resid_pre"))  # a cached route, built before the registration

    def build(spec, name, layer):
        if name == "resid_pre":
            return Access(f"{spec.layout.layers}.{layer}", "input")
        return Unsupported("this executor only reads resid_pre")

    sitemap.register_executor("probe", build, label="the probe executor", column="probe",
                              fix="Use model.run for it.")
    try:
        assert "probe" in sitemap.executors() and sitemap.executors()[0] == "native"
        route = model.sitemap.route(nk.site("L1.resid_pre"))
        assert route.access("probe") == Access("model.layers.1", "input")
        assert model.sitemap.route(nk.site("L0.resid_pre")).access("probe").module == "model.layers.0"
        with pytest.raises(UnsupportedError, match=r"L1\.attn\.v: this executor only reads resid_pre; "
                                                   r"not supported by the probe executor\. Use model\.run"):
            model.sitemap.route(nk.site("L1.attn.v")).access("probe")
        assert model.sitemap.names("probe") == ["embed"] + [f"L{l}.resid_pre" for l in range(3)] + ["logits"]
        rows = sitemap.support_table(model.spec)
        assert {r["site"]: r["probe"] for r in rows}["resid_pre"] == "✓"
        assert "| probe |" in sitemap.format_support_table(model.spec).splitlines()[0]
    finally:
        sitemap.unregister_executor("probe")
    assert "probe" not in sitemap.executors()
    with pytest.raises(nk.InputError, match="executor='probe'"):
        model.sitemap.route(nk.site("L0.resid_pre")).access("probe")


def test_refusals_keep_their_classes():
    neox = tiny_model("gpt_neox")
    route = neox.sitemap.route(nk.site("L0.resid_mid"))
    with pytest.raises(nk.SiteError, match="parallel residual"):  # natively: the model lacks it
        route.access("native")
    with pytest.raises(NotImplementedError, match="parallel residual.*nnsight"):
        route.access("nnsight")
    assert issubclass(UnsupportedError, nk.NotekvError) and issubclass(UnsupportedError, NotImplementedError)
    with pytest.raises(UnsupportedError, match="KVPatch: site L0.kv.k"):
        nk.hooks.compile_plan(neox, [nk.KVPatch(neox.run("hi"))], executor="nnsight")


def test_support_table_has_every_site_and_executor():
    rows = sitemap.support_table()
    assert [r["site"] for r in rows] == ["embed", *LAYER_SITES, "logits", sitemap.MASK_SITE]
    assert all(set(r) == {"site", *sitemap.executors()} for r in rows)
    assert all(r["native"] == "✓" or r["native"].startswith("✓ except") for r in rows)
    text = sitemap.format_support_table()
    assert len(text.splitlines()) >= len(rows) + 2 and "✓" in text


# ---------------------------------------------------------------- TransformerLens names come from the map
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "llama"])
def test_tl_names_are_the_maps(arch):
    model = tiny_model(arch)
    qk_norm = arch != "llama"
    assert model.sitemap.tl_name("L1.attn.k_pre") == ("blocks.1.attn.hook_k_normed" if qk_norm else "blocks.1.attn.hook_k")
    assert model.sitemap.tl_name("L1.attn.q_pre") == ("blocks.1.attn.hook_q_normed" if qk_norm else "blocks.1.attn.hook_q")
    for name in model.sitemap.names("tl"):
        s = nk.site(name)
        mapped = model.sitemap.tl_name(s)
        assert nk.site(mapped) == s  # the grammar parses what the map names
        if s.name in ("attn.q_pre", "attn.k_pre"):
            with pytest.raises(nk.SiteError, match="depends on the model.*sitemap.tl_name"):
                s.tl_name
        else:
            assert s.tl_name == mapped


def test_tl_name_refuses_cache_sites():
    with pytest.raises(nk.SiteError, match="no hook"):
        nk.site("L0.kv.k").tl_name
    with pytest.raises(NotImplementedError, match="cache slot"):
        tiny_model("llama").sitemap.tl_name("L0.kv.v")


# ---------------------------------------------------------------- attention arithmetic, once
def test_attention_arithmetic():
    from notekv.model import attnmath

    q = torch.tensor([3, 4, 5])
    k = torch.arange(6)
    ok = attnmath.visible(q, k, window=2)
    assert ok.tolist() == [[False, False, True, True, False, False],
                           [False, False, False, True, True, False],
                           [False, False, False, False, True, True]]
    assert attnmath.visible(q, k).sum().item() == 4 + 5 + 6
    m = attnmath.additive_mask(ok, torch.float32)
    assert m[0, 2] == 0 and m[0, 0] == torch.finfo(torch.float32).min
    x = torch.tensor([-100.0, 0.5, 100.0])
    assert torch.equal(attnmath.softcap(x, None), x)
    assert attnmath.scaled_scores(x, 0.5, 10.0).abs().max() < 10.0
    assert torch.equal(attnmath.scaled_scores(x, 0.5), x * 0.5)


def test_lean_mask_equals_the_hook_layer_rule():
    from notekv.lean.forward import attention_mask

    qpos, kpos = torch.tensor([7, 8]), torch.arange(9)
    m = attention_mask(qpos, kpos, 4, 2, torch.float32)[0, 0]
    assert m.shape == (4, 9)
    ok = m == 0
    for row, p in enumerate([7, 8, 7, 8]):
        assert ok[row].tolist() == [(j <= p and p - j < 4) for j in range(9)]


# ---------------------------------------------------------------- one way to stop a forward
def test_stop_after_ends_the_forward_quietly():
    from notekv.hooks.stop import StopForward, stop, stop_after, stopped
    from notekv.model.arch import get_submodule

    model = tiny_model("llama")
    seen = []
    layers = get_submodule(model.hf, model.spec.layout.layers)
    before = dict(layers[1]._forward_hooks)
    handles = [m.register_forward_hook(lambda *_a, i=i: seen.append(i)) for i, m in enumerate(layers)]
    try:
        with stop_after(layers[1]):
            model.hf(input_ids=torch.tensor([[1, 2, 3]]))
        assert seen == [0, 1]
        with stopped():
            with model.hooks(nk.Hook("L0.resid_post", stop)):
                model.hf(input_ids=torch.tensor([[1, 2, 3]]))
        assert seen == [0, 1, 0]
    finally:
        for h in handles:
            h.remove()
    assert dict(layers[1]._forward_hooks) == before  # the stop hook is gone
    with pytest.raises(StopForward):
        stop()


# ---------------------------------------------------------------- one error policy
def test_user_errors_are_input_errors_with_their_builtin():
    model = tiny_model("llama")
    for cls in (nk.SiteError, nk.PlanError, nk.SpanError, nk.SlotError, nk.GradError):
        assert issubclass(cls, nk.InputError) and issubclass(cls, ValueError), cls
    with pytest.raises(nk.InputError) as err:
        model.run("hi", interventions=["L0.resid_pre"])
    assert isinstance(err.value, TypeError) and "nk.Collect" in str(err.value)
    with pytest.raises(nk.InputError) as err:
        model.spec.kv_head_of(99)
    assert isinstance(err.value, IndexError) and "q_head=99" in str(err.value)
    with pytest.raises(nk.InputError) as err:
        nk.PerRow()
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
    with pytest.raises(nk.InputError, match="arch='nope'"):
        nk.tiny("nope")
    with pytest.raises(nk.InputError, match="capacity=0"):
        nk.LeanEngine(model, 0)
    from notekv.lean import forward_from

    with pytest.raises(nk.InputError) as err:
        forward_from(model, torch.zeros(1, 2, model.spec.d_model), 7, torch.arange(2))
    assert isinstance(err.value, IndexError)
