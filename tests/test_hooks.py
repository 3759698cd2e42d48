"""The hook layer on tiny random models of every supported family."""

import pytest
import torch

import notekv as nk
from notekv.hooks.attention import KnockoutError
from tests.conftest import count_hooks, tiny_model

TEXT = "order_status: shipped. Refund request: please decide now."
OLD = "order_status: shipped. Refund: ok?"
NEW = "order_status: stopped. Refund: ok?"  # same byte length, differs inside the field


def _plain(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids, output_hidden_states=True)


def test_collected_sites_match_hf(tiny):
    n = tiny.spec.n_layers
    sites = [f"L{l}.{s}" for l in range(n) for s in ("resid_pre", "resid_post", "attn.k", "attn.v", "kv.k", "kv.v")]
    run = tiny.run(TEXT, collect=sites + ["logits", "embed"])
    plain = _plain(tiny, run.ids)
    assert torch.allclose(run.logits, plain.logits, atol=1e-5, rtol=0)
    assert torch.equal(run["logits"], run.logits)
    assert torch.equal(run["embed"], plain.hidden_states[0])
    for l in range(n):
        assert torch.equal(run[f"L{l}.resid_pre"], plain.hidden_states[l])
        if l < n - 1:  # the last hidden state is after the final norm in HF
            assert torch.allclose(run[f"L{l}.resid_post"], plain.hidden_states[l + 1], atol=1e-5)
        assert torch.equal(run[f"L{l}.attn.k"], run.kv.keys[l])
        assert torch.equal(run[f"L{l}.kv.v"], run.kv.values[l])
        assert run[f"L{l}.attn.k"].shape == (1, tiny.spec.n_kv_heads, len(run.tokens), tiny.spec.head_dim)


def test_block_outputs_sum_to_residual(tiny):
    run = tiny.run(TEXT, collect=["L1.resid_pre", "L1.attn_out", "L1.mlp_out", "L1.resid_post"])
    total = run["L1.resid_pre"] + run["L1.attn_out"] + run["L1.mlp_out"]
    assert torch.allclose(total, run["L1.resid_post"], atol=1e-5)


def test_z_pattern_and_q_are_consistent(tiny):
    spec = tiny.spec
    run = tiny.run(TEXT, collect=["L0.attn.pattern", "L0.attn.z", "L0.attn.v", "L0.attn.q", "L0.attn.scores"])
    pat, v, z = run["L0.attn.pattern"], run["L0.attn.v"], run["L0.attn.z"]
    assert torch.allclose(pat.sum(-1), torch.ones_like(pat.sum(-1)), atol=1e-5)
    assert torch.all(torch.triu(pat[0, 0], diagonal=1) == 0)  # causal
    v_q = v.repeat_interleave(spec.group_size, dim=1)  # explicit GQA mapping
    assert torch.allclose(pat @ v_q, z, atol=1e-5)
    assert torch.allclose(torch.softmax(run["L0.attn.scores"], -1), pat, atol=1e-6)
    assert run["L0.attn.q"].shape == (1, spec.n_heads, len(run.tokens), spec.head_dim)
    if spec.window_of(0):  # Gemma's sliding layers: nothing beyond the window
        w = spec.window_of(0)
        assert torch.all(pat[0, :, -1, : len(run.tokens) - w] == 0)


def test_head_sites_select_one_head(tiny):
    run = tiny.run(TEXT, collect=["L0.attn.z", "L0.attn.z.h1", "L0.attn.k", "L0.attn.k.h0"])
    assert torch.equal(run["L0.attn.z.h1"], run["L0.attn.z"][:, 1])
    assert torch.equal(run["L0.attn.k.h0"], run["L0.attn.k"][:, 0])


def test_identity_hooks_are_bit_identical(tiny):
    base = tiny.run(TEXT).logits
    ident = [nk.Hook(f"L{l}.{s}", lambda t, hook: t) for l in range(tiny.spec.n_layers)
             for s in ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn.z", "attn.k_pre", "attn.q_pre")]
    assert torch.equal(tiny.run(TEXT, interventions=ident).logits, base)


def test_patching_kv_at_the_differing_token_restores_clean_logits(tiny):
    clean, corrupt = tiny.run(NEW), tiny.tokenize(OLD)
    diff = [i for i, (a, b) in enumerate(zip(clean.view.ids, corrupt.ids)) if a != b]
    assert diff
    patched = tiny.run(OLD, interventions=[nk.KVPatch(clean, at=nk.Pos(diff))])
    unpatched = tiny.run(OLD)
    assert (unpatched.logits[0, -1] - clean.logits[0, -1]).abs().max() > 1e-3
    assert torch.allclose(patched.logits[0, -1], clean.logits[0, -1], atol=1e-5)


def test_resid_patch_everywhere_reproduces_source(tiny):
    clean = tiny.run(NEW, collect=["L0.resid_pre"])
    patched = tiny.run(OLD, interventions=[nk.Patch("L0.resid_pre", clean)])
    assert torch.allclose(patched.logits, clean.logits, atol=1e-5)


def test_patch_one_head_of_z_changes_only_that_head(tiny):
    clean = tiny.run(NEW, collect=["L0.attn.z"])
    out = tiny.run(OLD, collect=["L0.attn.z"], interventions=[nk.Patch("L0.attn.z.h1", clean, at=nk.Last())])
    ref = tiny.run(OLD, collect=["L0.attn.z"])
    z, zr, zc = out["L0.attn.z"], ref["L0.attn.z"], clean["L0.attn.z"]
    # Collect runs after the patch (same site, registered later).
    assert torch.equal(z[:, 1, -1], zc[:, 1, -1])
    assert torch.equal(z[:, 0], zr[:, 0]) and torch.equal(z[:, 1, :-1], zr[:, 1, :-1])


def test_knockout_nothing_is_identical_and_everything_changes(tiny):
    base = tiny.run(TEXT, collect=["L0.attn.pattern"])
    n = len(base.tokens)
    empty = tiny.run(TEXT, interventions=[nk.Knockout(src=nk.Pos([]), dst=nk.Last())])
    assert torch.allclose(empty.logits, base.logits, atol=1e-5)
    # Every key but the query's own (sliding layers cannot see the first token).
    ko = tiny.run(TEXT, collect=["L0.attn.pattern"],
                  interventions=[nk.Knockout(src=nk.Range(0, n - 1), dst=nk.Last(), layers="all")])
    assert (ko.logits[0, -1] - base.logits[0, -1]).abs().max() > 1e-3
    assert torch.allclose(ko.logits[0, :-1], base.logits[0, :-1], atol=1e-5)  # other queries untouched
    assert torch.allclose(ko["L0.attn.pattern"][0, :, -1, -1], torch.ones(tiny.spec.n_heads), atol=1e-6)


def test_knockout_of_every_key_is_refused(tiny):
    with pytest.raises(KnockoutError, match="no key to attend"):
        tiny.run(TEXT, interventions=[nk.Knockout(src=None, dst=nk.Last(), layers=[0])])


def test_knockout_heads_only_touch_those_heads():
    model = tiny_model("llama")
    n = len(model.tokenize(TEXT))
    ko = model.run(TEXT, collect=["L1.attn.pattern"],
                   interventions=[nk.Knockout(src=nk.Range(1, n), dst=nk.Last(), layers=[1], heads=[2])])
    base = model.run(TEXT, collect=["L1.attn.pattern"])
    p, pb = ko["L1.attn.pattern"], base["L1.attn.pattern"]
    assert p[0, 2, -1, 0] == pytest.approx(1.0)
    assert torch.allclose(p[0, [0, 1, 3]], pb[0, [0, 1, 3]], atol=1e-6)


def test_steer_and_ablate():
    model = tiny_model("llama")
    d = model.spec.d_model
    base = model.run(TEXT, collect=["L1.resid_pre"])
    vec = torch.randn(d)
    st = model.run(TEXT, collect=["L1.resid_pre"], interventions=[nk.Steer("L1.resid_pre", vec, scale=2.0, at=nk.Pos(3))])
    delta = st["L1.resid_pre"] - base["L1.resid_pre"]
    assert torch.allclose(delta[0, 3], 2 * vec, atol=1e-5)
    assert delta[0, :3].abs().max() == 0 and delta[0, 4:].abs().max() == 0
    z = model.run(TEXT, collect=["L1.resid_pre"], interventions=[nk.Ablate("L1.resid_pre", "zero", at=nk.Span("shipped"))])
    span = nk.hooks.positions.resolve(nk.Span("shipped"), model.tokenize(TEXT))
    assert z["L1.resid_pre"][0, span].abs().max() == 0
    ref = torch.randn(3, 7, d)
    m = model.run(TEXT, collect=["L1.resid_pre"], interventions=[nk.Ablate("L1.resid_pre", "mean", at=nk.Pos(2), reference=ref)])
    assert torch.allclose(m["L1.resid_pre"][0, 2], ref.mean(dim=(0, 1)), atol=1e-6)
    rs = model.run(TEXT, collect=["L1.resid_pre"],
                   interventions=[nk.Ablate("L1.resid_pre", "resample", at=nk.Pos(2), reference=ref, seed=1)])
    assert any(torch.allclose(rs["L1.resid_pre"][0, 2], ref[b, 2]) for b in range(3))


def test_exception_inside_hooks_leaves_no_hook_and_restores_attention():
    model = tiny_model("llama")
    before = count_hooks(model.hf)
    impl = model.hf.config._attn_implementation
    ivs = [nk.Collect("L0.attn.pattern"), nk.Collect("L1.resid_pre"), nk.Collect("L0.kv.k"),
           nk.Knockout(src=nk.Pos(1), dst=nk.Last())]
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(*ivs):
            assert count_hooks(model.hf) > before
            assert model.hf.config._attn_implementation == "notekv"
            raise RuntimeError("boom")
    assert count_hooks(model.hf) == before
    assert model.hf.config._attn_implementation == impl
    assert not any(hasattr(m, "_notekv_attention") for m in model.hf.modules())
    # And after an exception raised by the model itself, mid-forward.
    bad = nk.Hook("L1.resid_pre", lambda t, hook: t[:, :1])
    with pytest.raises(ValueError, match="returned shape"):
        model.run(TEXT, interventions=[bad])
    assert count_hooks(model.hf) == before


def test_hooks_are_registered_only_where_needed():
    model = tiny_model("llama")
    with model.hooks(nk.Collect("L2.resid_post")):
        layer2 = model.hf.model.layers[2]
        assert len(layer2._forward_hooks) == 1
        assert count_hooks(model.hf) == 2  # the site + the base-model step tracker
        assert model.hf.config._attn_implementation == "sdpa"


def test_decode_step_intervention_hits_exactly_its_step():
    model = tiny_model("llama")
    prompt = "abc"
    n = len(model.tokenize(prompt))
    base = model.generate(prompt, max_new_tokens=6, collect=["L0.resid_pre"])
    target = n + 2  # the slot fed at decode step 3 (step 0 is the prefill)
    vec = torch.full((model.spec.d_model,), 5.0)
    steered = model.generate(prompt, max_new_tokens=6, collect=["L0.resid_pre"],
                             interventions=[nk.Steer("L0.resid_pre", vec, at=nk.Pos(target))])
    a, b = base.acts["L0.resid_pre"], steered.acts["L0.resid_pre"]
    assert len(a) == len(b) == 6  # one prefill + 5 decode steps feed the model
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]
    assert changed[0] == 3 and torch.allclose(b[3] - a[3], vec.expand_as(a[3]))
    assert torch.equal(base.ids[0, : n + 3], steered.ids[0, : n + 3])  # tokens before it unchanged


def test_run_with_past_never_mutates_the_shared_cache():
    model = tiny_model("llama")
    prefix = model.run("order_status: shipped.")
    keys = prefix.kv.keys.clone()
    n = len(prefix.kv)
    full = model.run("order_status: shipped. Refund?")
    for _ in range(2):
        cont = model.run(" Refund?", past=prefix, interventions=[nk.KVPatch(full, at=nk.Pos(1, 2))])
    assert len(prefix.kv) == n and prefix.hf_cache.get_seq_length() == n
    assert torch.equal(keys, prefix.kv.keys)
    # Continuation equals the full forward (no patch).
    cont = model.run(" Refund?", past=prefix)
    assert torch.allclose(cont.logits[0, -1], full.logits[0, -1], atol=1e-5)


def test_kv_patch_on_past_slots_in_a_decode_step():
    model = tiny_model("llama")
    old, new = model.run(OLD), model.run(NEW)
    diff = [i for i, (a, b) in enumerate(zip(old.view.ids, new.view.ids)) if a != b]
    old_prefix = model.run(old.ids[:, :-1])
    new_prefix = model.run(new.ids[:, :-1])
    last = old.ids[:, -1:]
    everything = model.run(last, past=old_prefix, interventions=[nk.KVPatch(new_prefix)])
    assert torch.allclose(everything.logits[0, -1], new.logits[0, -1], atol=1e-5)
    field = model.run(last, past=old_prefix, interventions=[nk.KVPatch(new_prefix, at=nk.Pos(diff))])
    stale = model.run(last, past=old_prefix)
    assert torch.allclose(stale.logits[0, -1], old.logits[0, -1], atol=1e-5)
    assert not torch.allclose(field.logits[0, -1], stale.logits[0, -1], atol=1e-4)
    assert torch.equal(field.kv.keys[0][:, :, diff], new_prefix.kv.keys[0][:, :, diff])


def test_text_selectors_continue_after_a_past_run():
    model = tiny_model("llama")
    prefix = model.run("status: ok.")
    run = model.run(" Then go", past=prefix, collect=["L0.resid_pre"],
                    interventions=[nk.Ablate("L0.resid_pre", "zero", at=nk.Span("go"))])
    assert run.view.text == "status: ok. Then go"
    assert run["L0.resid_pre"][0, -2:].abs().max() == 0 and run["L0.resid_pre"][0, 0].abs().max() > 0


def test_batched_prompts_of_unequal_length_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        tiny_model("llama").run(["ab", "abc"])


def test_canaries_pass_on_every_tiny(tiny):
    from notekv.hooks.canaries import run_canaries

    res = run_canaries(tiny)
    assert res["identity_max_diff"] == 0.0 and res["decode_max_diff"] < 1e-4


def test_parallel_residual_has_no_resid_mid():
    with pytest.raises(ValueError, match="parallel residual"):
        tiny_model("gpt_neox").run(TEXT, collect=["L1.resid_mid"])
    sequential = nk.tiny("gpt_neox", use_parallel_residual=False)
    run = sequential.run(TEXT, collect=["L1.resid_pre", "L1.attn_out", "L1.resid_mid"])
    assert torch.allclose(run["L1.resid_mid"], run["L1.resid_pre"] + run["L1.attn_out"], atol=1e-5)


def test_run_collect_is_full_even_beside_a_subset_collect():
    model = tiny_model("llama")
    run = model.run(TEXT, collect=["L0.resid_pre"], interventions=[nk.Collect("L0.resid_pre", at=nk.Last())])
    assert run["L0.resid_pre"].shape[1] == len(run.tokens)


def test_hooks_context_collects_per_forward():
    model = tiny_model("llama")
    ids = torch.tensor([model.tokenize(TEXT).ids])
    with model.hooks(nk.Collect("blocks.1.hook_resid_pre")) as h:
        with torch.no_grad():
            model.hf(input_ids=ids)
            model.hf(input_ids=ids[:, :5])
    got = h.acts("L1.resid_pre")
    assert [t.shape[1] for t in got] == [ids.shape[1], 5]
    assert torch.equal(got[0], model.run(TEXT, collect=["L1.resid_pre"])["L1.resid_pre"])
