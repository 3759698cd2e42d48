import json
import math

import pytest
import torch

import notekv as nk
from notekv.hooks import serialize as ivs
from notekv.hooks.positions import SpanError, TokenView, resolve
from notekv.model.arch import FAMILIES, UnsupportedArchitectureError, arch_spec
from tests.conftest import tiny_model


# ---------------------------------------------------------------- ArchSpec
def test_gemma3_tiny_has_two_rope_bases_and_window():
    spec = tiny_model("gemma3_text").spec
    local = [r for r, t in zip(spec.rope, spec.layer_types) if t == "sliding_attention"]
    glob = [r for r, t in zip(spec.rope, spec.layer_types) if t == "full_attention"]
    assert {r.base for r in local} == {1e4} and {r.base for r in glob} == {1e6}
    assert local[0].inv_freq[1] != pytest.approx(glob[0].inv_freq[1])
    assert spec.window_of(0) == 8 and spec.window_of(3) is None


def test_partial_rotary_and_yarn_facts():
    neox = tiny_model("gpt_neox").spec
    assert neox.rope[0].rotary_dim == 4 and neox.rope[0].head_dim == 16
    qwen = tiny_model("qwen3").spec
    assert qwen.rope[0].rope_type == "yarn"
    assert qwen.rope[0].attention_factor == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert tiny_model("llama").spec.rope[0].attention_factor == 1.0


def test_dynamic_rope_is_marked_unsupported():
    model = nk.tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    assert model.spec.rope[0].unsupported and "not shift-invariant" in model.spec.rope[0].unsupported


def test_gqa_mapping():
    spec = tiny_model("llama").spec  # 4 q heads, 2 kv heads
    assert [spec.kv_head_of(h) for h in range(4)] == [0, 0, 1, 1]
    assert spec.q_heads_of(1) == [2, 3]
    with pytest.raises(IndexError, match="out of range"):
        spec.kv_head_of(4)


def test_unknown_family_error_names_the_table():
    model = tiny_model("llama").hf
    model.config.model_type = "mystery"
    try:
        with pytest.raises(UnsupportedArchitectureError, match="mystery.*FAMILIES|family table"):
            arch_spec(model)
    finally:
        model.config.model_type = "llama"
    assert "llama" in FAMILIES


# ---------------------------------------------------------------- sites
@pytest.mark.parametrize("text, canonical", [
    ("L5.resid_pre", "L5.resid_pre"),
    ("blocks.5.hook_resid_pre", "L5.resid_pre"),
    ("blocks.2.attn.hook_rot_k", "L2.attn.k"),
    ("blocks.2.attn.hook_k", "L2.attn.k_pre"),
    ("blocks.0.attn.hook_pattern", "L0.attn.pattern"),
    ("L3.attn.z.h2", "L3.attn.z.h2"),
    ("L1.kv.v", "L1.kv.v"),
    ("logits", "logits"),
    ("hook_embed", "embed"),
])
def test_site_parsing(text, canonical):
    assert str(nk.site(text)) == canonical


def test_site_tl_name_round_trip():
    for name in ("L4.resid_post", "L4.attn.q", "L4.attn.scores", "L4.mlp_out"):
        s = nk.site(name)
        assert nk.site(s.tl_name) == s


def test_site_errors():
    with pytest.raises(nk.SiteError, match="unknown site"):
        nk.site("L3.attn.banana")
    with pytest.raises(nk.SiteError, match="no head axis"):
        nk.site("L3.resid_pre.h1")
    with pytest.raises(nk.SiteError, match="2 KV heads"):
        nk.site("L0.attn.k.h2").check(3, 4, 2)
    with pytest.raises(nk.SiteError, match="3 layers"):
        nk.site("L3.resid_pre").check(3, 4, 2)


def test_site_head_kinds():
    assert nk.site("L0.attn.k").head_kind == "kv"
    assert nk.site("L0.kv.v").head_kind == "kv"
    assert nk.site("L0.attn.z").head_kind == "q"
    assert nk.site("L0.resid_post").head_kind is None


# ---------------------------------------------------------------- positions
def test_span_and_selectors_on_byte_tokenizer():
    model = tiny_model("llama")
    text = "status: shipped. go"
    view = model.tokenize(text)
    assert view.tokens[0] == "<bos>"
    assert resolve(nk.Span("shipped"), view) == list(range(9, 16))  # BOS shifts chars by one slot
    assert resolve(nk.Last(), view) == [len(view) - 1]
    assert resolve(nk.Pos(-1), view) == [len(view) - 1]
    assert resolve(nk.Delims(within=nk.Span("status: shipped.")), view) == [7, 8, 16]
    assert resolve(nk.After(nk.Span("shipped")), view) == list(range(16, len(view)))
    assert resolve(nk.Where(lambda i, t: t == "s"), view)[0] == 1
    assert resolve(None, view) is None


def test_span_boundary_inside_token_is_refused(smollm2):
    view = smollm2.tokenize("order_status: shipped\nRefund")
    assert [view.tokens[i] for i in resolve(nk.Span("order_status: shipped"), view)] == \
        ["order", "_", "status", ":", " shipped"]
    assert [view.tokens[i] for i in resolve(nk.Span("shipped"), view)] == [" shipped"]
    with pytest.raises(SpanError, match="inside token .*' shipped'"):
        resolve(nk.Span("ship"), view)
    with pytest.raises(SpanError, match="occurs 0 time"):
        resolve(nk.Span("delivered"), view)


def test_span_occurrence_and_continuation_offsets():
    model = tiny_model("llama")
    view = model.tokenize("ab ab ab")
    assert resolve(nk.Span("ab", occurrence=-1), view) == [7, 8]
    cont = TokenView("xy", (1, 2), ("x", "y"), ((0, 1), (1, 2)), start=10)
    assert resolve(nk.Span("y"), cont) == [11]
    assert resolve(nk.Pos(3), cont) == [3]
    assert resolve(nk.Pos(-1), cont) == [11]


def test_text_selector_without_text_errors():
    with pytest.raises(SpanError, match="needs the prompt text"):
        resolve(nk.Span("x"), None, n_tokens=4)


# ---------------------------------------------------------------- interventions as data
def test_interventions_json_round_trip(tmp_path):
    model = tiny_model("llama")
    src = model.run("hello there", collect=["L1.resid_pre"])
    items = [
        nk.Collect("L0.resid_post", at=nk.Span("hello")),
        nk.Patch("L1.resid_pre", src, at=nk.Pos(2, 3)),
        nk.Patch("L1.attn.z.h1", torch.randn(1, 12, 16), at=nk.Last()),
        nk.Ablate("L2.mlp_out", kind="mean", reference=torch.randn(2, 5, 64)),
        nk.Steer("blocks.1.hook_resid_post", torch.arange(64.0), scale=0.5, at=nk.Delims()),
        nk.Knockout(src=nk.After(nk.Span("hello")), dst=nk.Last(), layers=[0, 2], heads=1),
        nk.KVPatch(src, at=nk.Range(1, 4), layers="all", heads=[0], which="k"),
    ]
    path = tmp_path / "ivs.json"
    nk.save_interventions(items, path)
    json.loads(path.read_text())  # plain JSON
    back = nk.load_interventions(path)
    assert [type(b) for b in back] == [type(i) for i in items]
    assert back[0] == items[0] and back[5] == items[5]
    assert torch.equal(back[1].source.acts["L1.resid_pre"], src.acts["L1.resid_pre"])
    assert torch.equal(back[2].source, items[2].source)
    assert torch.equal(back[4].vector, items[4].vector) and back[4].site == nk.site("L1.resid_post")
    assert torch.equal(back[6].source.kv.keys[2], src.kv.keys[2])
    assert back[6].source is back[1].source  # one Run, stored once
    assert back[6].heads == (0,) and back[6].which == "k"
    # A loaded patch behaves like the original.
    a = model.run("hello world", interventions=[items[1]]).logits
    b = model.run("hello world", interventions=[back[1]]).logits
    assert torch.equal(a, b)


def test_runtime_only_interventions_refuse_serialization(tmp_path):
    with pytest.raises(TypeError, match="runtime-only"):
        ivs.to_json([nk.Hook("L0.resid_pre", lambda t, hook: t)])
    with pytest.raises(TypeError, match="cannot be serialized"):
        ivs.to_json([nk.Collect("L0.resid_pre", at=nk.Where(lambda i, t: True))])


def test_intervention_argument_errors():
    with pytest.raises(ValueError, match="zero"):
        nk.Ablate("L0.resid_pre", kind="bogus")
    with pytest.raises(ValueError, match="reference"):
        nk.Ablate("L0.resid_pre", kind="resample")
    with pytest.raises(ValueError, match="'k', 'v' or 'kv'"):
        nk.KVPatch(None, which="q")
