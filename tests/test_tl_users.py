"""What a TransformerLens / nnsight user brings: hooks by TransformerLens name in TransformerLens's
layout on every executor, ActivationCache and nnsight values as Patch sources, TL-style
conveniences on HookedModel, honest model labels, and spans that never resolve silently elsewhere."""

import warnings

import pytest
import torch

import notekv as nk
from tests.conftest import tiny_model

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from notekv.backends.nnsight import NNsightBackend  # noqa: E402
from notekv.backends.tl import TLBackend  # noqa: E402

CLEAN = "order status shipped, refund ok"
CORRUPT = "order status lost!!!, refund ok"

_backends: dict = {}


def backends(arch: str):
    """(model, TLBackend, NNsightBackend) of tiny ``arch``, built once."""
    if arch not in _backends:
        model = tiny_model(arch)
        _backends[arch] = (model, TLBackend(model), NNsightBackend(model))
    return _backends[arch]


def tl_edit_in_place(x, hook):
    """A TransformerLens-style hook: edits one head (axis 2 of [B, S, H, D]) at the last position."""
    if x.dim() == 4:
        x[:, -1, 1] = 0
    else:
        x[:, -1, :7] = 0


def tl_edit_returned(x, hook):
    out = x.clone()
    if x.dim() == 4:
        out[:, -1, 1] *= 3
        out[:, 1, 0] += 0.5
    else:
        out[:, 2, :9] += 1
    return out


def _each_executor(model, tl, nn_, name, fn):
    """{executor: logits or the error it raised} of ``fn`` at ``name`` through notekv."""
    out = {}
    for label, runner in (("native", model.run), ("tl", tl.run), ("nnsight", nn_.run)):
        try:
            out[label] = runner(CLEAN, interventions=[nk.Hook(name, fn)]).logits
        except (nk.UnsupportedError, nk.SiteError) as err:
            out[label] = err
    return out


# ---------------------------------------------------------------------- (1) hooks by TL name
@pytest.mark.parametrize("arch,names", [
    ("llama", ["blocks.1.attn.hook_z", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v",
               "blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_pattern",
               "blocks.1.attn.hook_attn_scores", "blocks.1.hook_resid_pre"]),
    pytest.param("qwen3", ["blocks.1.attn.hook_q_normed", "blocks.1.attn.hook_k_normed", "blocks.1.attn.hook_z"],
                 marks=pytest.mark.slow),  # the bridge's QK-normed hooks are [B, H, S, D]
])
def test_tl_hook_by_tl_name_equals_transformer_lens_run_with_hooks(arch, names):
    model, tl, nn_ = backends(arch)
    ids = model.encode(CLEAN)[0]
    base = tl.bridge(ids)
    for name in names:
        for fn in (tl_edit_in_place, tl_edit_returned):
            ref = tl.bridge.run_with_hooks(ids, fwd_hooks=[(name, fn)])
            assert (ref - base).abs().max() > 1e-3, (name, fn.__name__)  # the edit matters
            for label, got in _each_executor(model, tl, nn_, name, fn).items():
                if isinstance(got, Exception):  # only nnsight, which cannot reach inside the kernel
                    assert label == "nnsight" and "attention kernel" in str(got), (name, label, got)
                    continue
                assert torch.allclose(got, ref, atol=1e-5), (name, fn.__name__, label, (got - ref).abs().max())


def test_notekv_name_keeps_notekv_layout_and_both_call_styles_work():
    model = tiny_model("llama")
    seen = {}

    def positional(z, h):  # TransformerLens style, the context under another name
        seen["positional"] = (tuple(z.shape), h.name, h.layer(), h.layer == 1, h.layer + 1)

    def keyword(z, *, hook):
        seen["keyword"] = (tuple(z.shape), hook.name, hook.layer())

    model.run(CLEAN, interventions=[nk.Hook("L1.attn.z", positional), nk.Hook("blocks.1.attn.hook_z", keyword)])
    s, h, d = model.encode(CLEAN)[0].shape[1], model.spec.n_heads, model.spec.head_dim
    assert seen["positional"] == ((1, h, s, d), "L1.attn.z", 1, True, 2)  # notekv's layout, [B, H, S, D]
    assert seen["keyword"] == ((1, s, h, d), "blocks.1.attn.hook_z", 1)  # TransformerLens's, [B, S, H, D]
    with pytest.raises(nk.InputError, match=r"fn\(tensor, hook\)"):
        nk.Hook("L1.attn.z", lambda z: z)


def test_a_tl_name_that_is_not_the_models_hook_is_refused_with_notekvs_layout():
    normed = r"L1.attn.q_pre \[B, H_q, S, D\] is TransformerLens's 'blocks.1.attn.hook_q_normed'"
    with pytest.raises(nk.SiteError, match=normed):  # hook_q is before the QK-norm there
        tiny_model("qwen3").run(CLEAN, interventions=[nk.Hook("blocks.1.attn.hook_q", tl_edit_in_place)])
    with pytest.raises(nk.SiteError, match=r"notekv's layout \[B, H_q, S, D\]"):  # the bridge never fires it
        tiny_model("gpt_neox").run(CLEAN, interventions=[nk.Hook("blocks.1.attn.hook_rot_q", tl_edit_in_place)])


# ---------------------------------------------------------------------- (11) bridges both ways
def test_patch_from_a_tl_activation_cache_equals_patch_from_a_run():
    model, tl, nn_ = backends("llama")
    clean = model.run(CLEAN, collect="all")
    _, cache = tl.bridge.run_with_cache(model.encode(CLEAN)[0])
    for site in ("L1.attn.z", "L1.resid_pre", "L1.attn.k", "L1.attn.v", "L0.attn.q_pre", "L2.attn.pattern"):
        from_run = model.run(CORRUPT, interventions=[nk.Patch(site, clean, at=nk.Last())]).logits
        from_tl = model.run(CORRUPT, interventions=[nk.Patch(site, cache, at=nk.Last())]).logits
        assert torch.allclose(from_tl, from_run, atol=1e-5), site
    # an nnsight saved module value, converted by the site map
    ids = model.encode(CLEAN)[0]
    env, kind = nn_.envoy_of("L1.attn.z")
    assert kind == "input"
    with nn_.nnmodel.trace(ids):
        z = env.input.save()
    z = nn_.to_notekv("L1.attn.z", z)
    assert torch.allclose(tl.to_notekv("L1.attn.z", cache["blocks.1.attn.hook_z"]), z, atol=1e-5)
    assert torch.allclose(z, clean["L1.attn.z"], atol=1e-5)
    patched = model.run(CORRUPT, interventions=[nk.Patch("L1.attn.z", z, at=nk.Last())]).logits
    assert torch.allclose(patched, model.run(CORRUPT, interventions=[nk.Patch("L1.attn.z", clean, at=nk.Last())]).logits,
                          atol=1e-5)


# ---------------------------------------------------------------------- (13) honest labels
def test_bundled_models_and_loads_say_what_the_weights_are():
    for m in nk.bundled_models():
        assert "4-bit GGUF" in m["description"] and "dequantized to float32" in m["description"], m
    tiny = tiny_model("llama")
    assert tiny.provenance.format == "random" and "random init" in repr(tiny)
    wrapped = nk.wrap(tiny.hf, tiny.tokenizer, name="mine")
    assert wrapped.provenance.to_dict()["format"] in ("memory", "random")


@pytest.mark.slow
def test_smollm2_provenance_says_4bit_gguf_dequantized(smollm2):
    p = smollm2.provenance
    assert (p.format, p.quantization, p.bits, p.dequantized_to) == ("gguf", "Q4_1", 4, "float32")
    assert p.file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "4-bit GGUF" in repr(smollm2) and "Q4_1" in repr(smollm2)
    assert p.to_dict()["summary"] == str(p)


# ---------------------------------------------------------------------- (16) spans
FEW_SHOT = ("Refund if delivered.\n#1 order_status: delivered. -> granted\n#2 order_status: lost. -> denied\n"
            "#3 order_status: cancelled. ->")


def test_a_span_is_found_where_the_user_means_or_refused(tiny_scenario):
    view = tiny_model("llama").tokenize(FEW_SHOT)
    with pytest.raises(nk.SpanError, match="occurs 3 times.*occurrence 0 on line 1.*occurrence 2 on line 3.*Say which"):
        nk.Span("order_status:").resolve(view)
    # the query's own field: absent from the last line is refused, not found in an earlier example
    with pytest.raises(nk.SpanError, match="not found: it occurs 0 times in line -1 '#3 order_status: cancelled"):
        nk.Span("order_status: delivered", line=-1).resolve(view)
    assert nk.Span("order_status: cancelled", line=-1).resolve(view) == \
        nk.Span("order_status: cancelled").resolve(view)
    m = nk.Span("order_status: delivered", occurrence=-1).match(view)  # explicit: and it says where it went
    assert (m.occurrence, m.count, m.line) == (0, 1, 1) and "line 1" in str(m)
    assert nk.Span("order_status:", occurrence=-1).match(view).line == 3
    # the scenario harness names its occurrence and keeps working, the field's value repeated or not
    for old, new in (("good", "bad!"), ("lost", "good"), ("bad!", "good")):
        pair = tiny_scenario.pair(tiny_model("llama"), old=old, new=new)
        query_field = nk.Span(f"status: {old}", line=-1).resolve(tiny_model("llama").tokenize(pair.old))
        assert list(pair.span_slots) == query_field


# ---------------------------------------------------------------------- (18) conveniences
def test_tl_style_conveniences():
    model, tl, _ = backends("llama")
    ids = model.to_tokens(CLEAN)
    assert ids.shape == (1, len(model.tokenize(CLEAN))) and int(ids[0, 0]) == model.tokenizer.bos_token_id
    assert torch.equal(model(CLEAN), model.run(CLEAN).logits)
    assert model.to_str_tokens(CLEAN) == model.to_str_tokens(ids) == list(model.tokenize(CLEAN).tokens)
    logits, cache = model.run_with_cache(CLEAN)
    assert torch.allclose(logits, model(CLEAN), atol=1e-5) and "blocks.1.attn.hook_z" in cache
    _, tl_cache = tl.bridge.run_with_cache(ids)
    for name in ("blocks.1.attn.hook_z", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_pre"):
        assert cache[name].shape == tl_cache[name].shape, name
        assert torch.allclose(cache[name], tl_cache[name], atol=1e-5), name
    assert cache["L1.attn.z"].shape == (1, model.spec.n_heads, ids.shape[1], model.spec.head_dim)
