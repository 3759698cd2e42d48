"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS), attention
sinks (GPT-OSS) and sliding windows across families, against references computed by hand
on the plain HF models (their weights, plain PyTorch hooks, explicit positions)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import notekv as nk
from notekv.capabilities import SHIFT_RANGE
from notekv.hooks import compile_plan
from notekv.hooks import moe as moe_mod
from notekv.hooks.canaries import run_canaries
from notekv.hooks.sitemap import UnsupportedError, format_support_table, support_table
from notekv.model.tiny import TINY_CONFIGS

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]
SLIDING = [a for a in ("gemma3_text", "gpt_oss", "gemma2") if a in TINY_CONFIGS]
TEXT = "The order status is delivered. Refund request: granted, thanks."
OTHER = "A cat sat on the mat and asked for a refund of its fish today!!"
_models: dict[str, nk.HookedModel] = {}
SEED = random.SystemRandom().randrange(2**31)


def model_of(arch: str) -> nk.HookedModel:
    if arch not in _models:
        _models[arch] = nk.tiny(arch)
    return _models[arch]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64: the relative error of a whole tensor."""
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------- the MoE block by hand
def _block(hf, layer: int):
    return hf.model.layers[layer].mlp


def _router(mlp):
    return mlp.router if hasattr(mlp, "router") else mlp.gate


def hand_logits(mlp, x: torch.Tensor) -> torch.Tensor:
    """Router logits ``[T, E]`` from the router's weight (and bias)."""
    r = _router(mlp)
    out = x @ r.weight.T
    return out + r.bias if getattr(r, "bias", None) is not None else out


def hand_route(arch: str, mlp, logits: torch.Tensor, k: int):
    if arch == "gpt_oss":  # top-k of the logits, softmax over the k
        top, idx = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=-1), idx
    top, idx = torch.topk(torch.softmax(logits.double(), dim=-1), k, dim=-1)
    if arch == "mixtral" or _router(mlp).norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    return top.to(logits.dtype), idx


def hand_expert(arch: str, experts, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` of the fused experts module on ``x [N, d]``, from its 3-D weights."""
    if arch == "gpt_oss":  # transposed weights with biases, interleaved gate/up, clamped SwiGLU
        gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gu[..., ::2].clamp(max=experts.limit), gu[..., 1::2].clamp(-experts.limit, experts.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * experts.alpha)) @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def hand_contributions(arch: str, mlp, x: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, E, d]``: each expert's weighted output per token, 0 where not routed."""
    w, idx = hand_route(arch, mlp, logits, k)
    out = torch.zeros(x.shape[0], logits.shape[1], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            out[t, e] = w[t, j] * hand_expert(arch, mlp.experts, x[t : t + 1], e)[0]
    return out


def hand_shared(mlp, x: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE's sigmoid-gated shared expert (0 elsewhere)."""
    if not hasattr(mlp, "shared_expert"):
        return torch.zeros_like(x)
    s = mlp.shared_expert
    dense = (F.silu(x @ s.gate_proj.weight.T) * (x @ s.up_proj.weight.T)) @ s.down_proj.weight.T
    return torch.sigmoid(x @ mlp.shared_expert_gate.weight.T) * dense


def mlp_input(m: nk.HookedModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The MoE block's input ``[T, d]`` in a plain HF forward (a plain PyTorch pre-hook)."""
    got = {}
    h = _block(m.hf, layer).register_forward_pre_hook(lambda mod, args: got.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            m.hf(ids)
    finally:
        h.remove()
    return got["x"].reshape(-1, got["x"].shape[-1])


def hf_logits_with_block(m: nk.HookedModel, ids: torch.Tensor, layer: int, block_out: torch.Tensor) -> torch.Tensor:
    """Plain HF logits with layer ``layer``'s MoE block output replaced by ``block_out [T, d]``."""
    def hook(mod, args, out):
        new = block_out.reshape(args[0].shape)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
    h = _block(m.hf, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return m.hf(ids).logits
    finally:
        h.remove()


@pytest.mark.parametrize("arch", MOE)
def test_moe_sites_equal_the_block_by_hand(arch):
    m = model_of(arch)
    spec = m.spec
    assert spec.moe_layers and spec.n_experts == 4 and spec.experts_per_token == 2
    names = m.sitemap.names()
    # every site of the map, the MoE ones included (attention internals switch the model to
    # notekv's eager attention: equal to HF's SDPA forward within float rounding)
    run = m.run(TEXT, collect=names)
    ids = run.ids
    with torch.no_grad():
        ref = m.hf(ids, output_hidden_states=True, use_cache=True)
    n = spec.n_layers
    for l in range(n - 1):
        assert rel(run[f"L{l}.resid_post"], ref.hidden_states[l + 1]) < 1e-5
    assert rel(m.hf.model.norm(run[f"L{n - 1}.resid_post"]), ref.hidden_states[n]) < 1e-5
    assert rel(run.logits, ref.logits) < 1e-5
    for l in range(n):  # HF's sliding-window cache layers keep the last window - 1 tokens; notekv keeps all
        hk, hv = ref.past_key_values.layers[l].keys, ref.past_key_values.layers[l].values
        w = spec.window_of(l)
        assert hk.shape[2] == (ids.shape[1] if w is None else w - 1)
        assert rel(run[f"L{l}.kv.k"][:, :, -hk.shape[2]:], hk) < 1e-5
        assert rel(run[f"L{l}.kv.v"][:, :, -hv.shape[2]:], hv) < 1e-5
    assert rel(run.kv.keys[n - 1], ref.past_key_values.layers[n - 1].keys) < 1e-5
    for l in spec.moe_layers:
        mlp = _block(m.hf, l)
        x = mlp_input(m, ids, l)
        logits = hand_logits(mlp, x)
        contrib = hand_contributions(arch, mlp, x, logits, spec.experts_per_token)
        T = x.shape[0]
        assert run[f"L{l}.moe.router"].shape == (1, T, 4)
        assert rel(run[f"L{l}.moe.router"][0], logits) < 1e-5
        got = run[f"L{l}.moe.experts"][0]
        assert got.shape == (T, 4, spec.d_model)
        assert rel(got, contrib) < 1e-5
        assert torch.equal(got.abs().sum(-1) > 0, contrib.abs().sum(-1) > 0)  # exactly the routed pairs
        # the experts summed, plus any shared expert, are the block's output
        assert rel(got.sum(1) + hand_shared(mlp, x), run[f"L{l}.mlp_out"][0]) < 1e-5


@pytest.mark.parametrize("arch", MOE)
def test_expert_knockout_reroutes_like_the_block_by_hand(arch, tmp_path):
    m = model_of(arch)
    l = m.spec.moe_layers[-1]
    ids = m.run(TEXT).ids
    mlp = _block(m.hf, l)
    x = mlp_input(m, ids, l)
    logits = hand_logits(mlp, x)
    tokens = [3, 11, ids.shape[1] - 1]
    top = int(logits[tokens[0]].argmax())  # the first token's favourite expert, surely routed to
    knock = torch.zeros_like(logits, dtype=torch.bool)
    knock[tokens, top] = True
    k = m.spec.experts_per_token
    want = hand_contributions(arch, mlp, x, logits.masked_fill(knock, float("-inf")), k).sum(1) + hand_shared(mlp, x)
    ko = nk.ExpertKnockout(l, experts=[top], at=nk.Pos(tokens))
    run = m.run(ids, interventions=[ko], collect=[f"L{l}.mlp_out", f"L{l}.moe.experts"])
    assert rel(run[f"L{l}.mlp_out"][0], want) < 1e-5
    assert not run[f"L{l}.moe.experts"][0, tokens, top].any()  # the expert gets none of them
    plain = m.run(ids, collect=[f"L{l}.mlp_out"])
    others = [t for t in range(ids.shape[1]) if t not in tokens]
    # the other tokens keep their routing (the fused experts kernel groups tokens differently: rounding)
    assert rel(run[f"L{l}.mlp_out"][0, others], plain[f"L{l}.mlp_out"][0, others]) < 1e-6
    assert rel(run[f"L{l}.mlp_out"][0, tokens[0]], plain[f"L{l}.mlp_out"][0, tokens[0]]) > 1e-3
    assert rel(run.logits, hf_logits_with_block(m, ids, l, want)) < 1e-5
    # serializable like the other interventions
    nk.save_interventions([ko], tmp_path / "ko.json")
    back = nk.load_interventions(tmp_path / "ko.json")
    assert back == [ko]
    assert torch.equal(m.run(ids, interventions=back).logits, run.logits)


def test_expert_knockout_refusals():
    m = model_of("mixtral")
    with pytest.raises(nk.ExpertKnockoutError, match="fewer than the 2"):
        m.run(TEXT, interventions=[nk.ExpertKnockout(0, experts=[0, 1, 2])])
    with pytest.raises(nk.SiteError, match="expert 7 out of range"):
        m.run(TEXT, interventions=[nk.ExpertKnockout(0, experts=[7])])
    with pytest.raises(nk.SiteError, match="llama has a dense MLP"):
        model_of("llama").run(TEXT, interventions=[nk.ExpertKnockout("all", experts=[0])])
    with pytest.raises(nk.SiteError, match="llama has a dense MLP"):
        model_of("llama").run(TEXT, collect=["L0.moe.router"])
    q2 = model_of("qwen2_moe")  # layer 1 is a dense MLP (mlp_only_layers)
    assert q2.spec.moe_layers == (0, 2) and "L1.moe.router" not in q2.sitemap.names()
    with pytest.raises(nk.SiteError, match="layer 1 of this qwen2_moe model is a dense MLP"):
        q2.run(TEXT, interventions=[nk.ExpertKnockout(1, experts=[0])])
    for ex in ("tl", "nnsight"):
        with pytest.raises(UnsupportedError, match="ExpertKnockout: site L0.moe.router"):
            compile_plan(m, [nk.ExpertKnockout(0, experts=[0])], executor=ex)
        with pytest.raises(UnsupportedError, match="moe.experts"):
            compile_plan(m, [nk.Collect("L0.moe.experts")], executor=ex)


@pytest.mark.parametrize("arch", MOE)
def test_patch_steer_ablate_hook_on_moe_sites(arch):
    m = model_of(arch)
    l, k = m.spec.moe_layers[0], m.spec.experts_per_token
    ids = m.run(TEXT).ids
    src = m.run(OTHER[: ids.shape[1] - 1], collect=[f"L{l}.moe.router"])
    assert src.ids.shape == ids.shape
    mlp = _block(m.hf, l)
    x = mlp_input(m, ids, l)
    logits = hand_logits(mlp, x)
    last = ids.shape[1] - 1

    # Patch the router logits of the last token from another prompt: it is re-routed
    patched = logits.clone()
    patched[last] = src[f"L{l}.moe.router"][0, last]
    want = hand_contributions(arch, mlp, x, patched, k).sum(1) + hand_shared(mlp, x)
    got = m.run(ids, interventions=[nk.Patch(f"L{l}.moe.router", src, at=nk.Last())])
    assert rel(got.logits, hf_logits_with_block(m, ids, l, want)) < 1e-5
    assert rel(got.logits, m.run(ids).logits) > 1e-4

    # A Hook scaling every router logit by 3 (sharper routing)
    hooked = m.run(ids, interventions=[nk.Hook(f"L{l}.moe.router", lambda t, hook: t * 3)])
    want = hand_contributions(arch, mlp, x, logits * 3, k).sum(1) + hand_shared(mlp, x)
    assert rel(hooked.logits, hf_logits_with_block(m, ids, l, want)) < 1e-5

    # Steer each expert's output by its own vector at the last token
    vec = torch.randn(4, m.spec.d_model, generator=torch.Generator().manual_seed(1))
    base = hand_contributions(arch, mlp, x, logits, k).sum(1) + hand_shared(mlp, x)
    want = base.clone()
    want[last] += vec.sum(0)
    got = m.run(ids, interventions=[nk.Steer(f"L{l}.moe.experts", vec, at=nk.Last())])
    assert rel(got.logits, hf_logits_with_block(m, ids, l, want)) < 1e-5

    # Zero-ablate every expert's output at token 4: only the shared expert (if any) is left
    want = base.clone()
    want[4] = hand_shared(mlp, x)[4]
    got = m.run(ids, interventions=[nk.Ablate(f"L{l}.moe.experts", at=nk.Pos(4))])
    assert rel(got.logits, hf_logits_with_block(m, ids, l, want)) < 1e-5


def test_moe_sites_are_refused_by_the_backends_and_in_the_support_table():
    rows = {r["site"]: r for r in support_table()}
    for name in ("moe.router", "moe.experts"):
        assert rows[name]["native"].startswith("✓ except") and "dense MLP" in rows[name]["native"]
        assert "mixtral" not in rows[name]["native"].split(":")[0]
    assert "`moe.router`" in format_support_table()
    with pytest.raises(nk.SiteError, match="has no head axis"):
        nk.site("L0.moe.experts.h1")
    assert nk.site("L3.moe.experts").pos_dim == 1


# ---------------------------------------------------------------------- attention sinks
def test_sinks_pattern_scores_q_match_hf_eager():
    m = model_of("gpt_oss")
    ids = m.run(TEXT).ids
    names = [f"L{l}.attn.{s}" for l in range(2) for s in ("pattern", "scores", "q")]
    run = m.run(ids, collect=names)
    with torch.no_grad():
        ref = m.hf(ids, output_attentions=True)
    plain = m.run(ids)
    assert torch.equal(run.logits, plain.logits)  # notekv's attention computes what HF's eager one does
    for l in range(2):
        pat, sc = run[f"L{l}.attn.pattern"], run[f"L{l}.attn.scores"]
        assert torch.equal(pat, ref.attentions[l])
        sinks = m.hf.model.layers[l].self_attn.sinks
        share = torch.sigmoid(torch.logsumexp(sc, -1) - sinks[None, :, None])  # what the sink leaves
        assert rel(pat.sum(-1), share) < 1e-5 and float(pat.sum(-1).max()) < 1 - 1e-3
    # sliding layer 0: the window (8) holds, global layer 1 sees everything before
    assert not run["L0.attn.pattern"][0, :, 20, :13].any() and run["L1.attn.pattern"][0, :, 20, :13].all()
    assert run_canaries(m)["pattern_row_error"] < 1e-5


def test_sinks_knockout_of_every_key_leaves_the_sink():
    m = model_of("gpt_oss")
    ids = m.run(TEXT).ids
    last = ids.shape[1] - 1
    got = m.run(ids, interventions=[nk.Knockout(src=nk.All(), dst=nk.Last(), layers=[1])],
                collect=["L1.attn.z", "L1.attn.pattern"])
    assert not got["L1.attn.pattern"][0, :, last].any() and not got["L1.attn.z"][0, :, last].any()
    attn = m.hf.model.layers[1].self_attn

    def zero_last(mod, args):  # o_proj's input at the last token: the heads' output, all at the sink
        x = args[0].clone()
        x[:, last] = 0
        return (x,)
    h = attn.o_proj.register_forward_pre_hook(zero_last)
    try:
        with torch.no_grad():
            want = m.hf(ids).logits
    finally:
        h.remove()
    assert rel(got.logits, want) < 1e-5
    with pytest.raises(nk.hooks.attention.KnockoutError):  # without sinks it stays refused
        model_of("mixtral").run(ids, interventions=[nk.Knockout(src=nk.All(), dst=nk.Last(), layers=[1])])


def test_sinks_key_fixed_attribution_matches_exact_patching():
    import dataclasses

    from notekv.attribution.exact import exact_kv

    m = model_of("gpt_oss")
    old = nk.KVCache.prefill(m, "The order status is delivered, ok")
    g = torch.Generator().manual_seed(0)
    keys = old.keys + 0.5 * torch.randn(old.keys.shape, generator=g) * old.keys.abs().mean()
    new = dataclasses.replace(old, keys=keys, origin_keys=keys)
    est = nk.attribute_kv(m, old, new, int(old.token_ids[-1]), 10, 20)
    cells = [(l, s, h) for l in range(2) for s in range(len(old)) for h in range(m.spec.n_kv_heads)]
    exact = exact_kv(m, old, new, int(old.token_ids[-1]), 10, 20, cells, which="k")
    fixed = torch.tensor([float(est.k_fixed[0, l, h, s]) for l, s, h in cells], dtype=torch.float64)
    plain = torch.tensor([float(est.k[0, l, h, s]) for l, s, h in cells], dtype=torch.float64)
    err = float((fixed - exact).norm() / exact.norm())
    assert err < 0.01 and err < 0.2 * float((plain - exact).norm() / exact.norm())


# ---------------------------------------------------------------------- shift invariance
@pytest.mark.parametrize("arch", MOE)
def test_shift_invariance(arch):
    m = model_of(arch)
    d = random.Random(SEED + len(arch)).randrange(1, SHIFT_RANGE + 1)
    at0 = nk.KVCache.prefill(m, TEXT)
    moved = nk.KVCache.prefill(m, TEXT, offset=d).reposition(-d)
    for l in range(m.spec.n_layers):
        err = rel_norm(moved.keys[l], at0.keys[l])
        assert err < 1e-5, f"{arch} layer {l}: offset {d} (seed {SEED}) relative error {err:.3g}"
        assert rel_norm(moved.values[l], at0.values[l]) < 1e-5, f"offset {d} (seed {SEED})"


# ---------------------------------------------------------------------- sliding windows
A = "The refund policy says: items may be returned within thirty days."
B = " Decision: the request is granted today."
P = "Some preamble that is certainly longer than the window."


@pytest.mark.parametrize("arch", SLIDING)
def test_splice_chunk_longer_than_the_window_past_the_window(arch):
    m = model_of(arch)
    w, L = m.spec.sliding_window, m.spec.n_layers
    chunk = nk.KVCache.prefill(m, A)
    assert w and len(chunk) > 4 * w
    # seam-free: the chunk first, text after it, vs a full prefill
    full = nk.KVCache.prefill(m, A + B)
    spliced = nk.splice(m, [chunk, B])
    assert max(rel(spliced.keys[l], full.keys[l]) for l in range(L)) < 1e-5
    assert max(rel(spliced.values[l], full.values[l]) for l in range(L)) < 1e-5
    d = random.Random(SEED).randrange(w + 1, 512)  # precompiled past the window, moved to 0 (float32 RoPE drifts past ~1e-5 beyond ~1k)
    moved = nk.splice(m, [nk.KVCache.prefill(m, A, offset=d), B])
    assert max(rel_norm(moved.keys[l], full.keys[l]) for l in range(L)) < 1e-5, f"offset {d} (seed {SEED})"
    # past the window: a prefix longer than the window, then the isolated chunk, then text; the
    # reference is one forward where the chunk's queries may not read the prefix
    sp = nk.splice(m, [P, chunk, B])
    n_p = len(sp) - len(spliced)
    assert n_p > w
    ko = nk.Knockout(src=nk.Pos(list(range(n_p))), dst=nk.Pos(list(range(n_p, n_p + len(chunk)))))
    ref = m.run(sp.token_ids[None], interventions=[ko])
    assert max(rel(sp.keys[l], ref.kv.keys[l]) for l in range(L)) < 1e-5
    assert max(rel(sp.values[l], ref.kv.values[l]) for l in range(L)) < 1e-5
    q = m.run(" Answer:", past=sp)
    want = m.run(torch.cat([sp.token_ids, q.ids[0]])[None], interventions=[ko]).logits[:, -1]
    assert rel(q.logits[:, -1], want) < 1e-5


@pytest.mark.parametrize("arch", [a for a in SLIDING if a != "gemma3_text"])
def test_selective_recompute_past_the_window_is_exact(arch):
    from notekv.edit import EditableContext

    template = ("agent: {agent}\nRule: allow only if status is ok.\nstatus: {status}\nNote: please check the "
                "request now.\nname: {name}\nEnd of record.\n")
    ctx = EditableContext(model_of(arch), template, {"agent": "Ann", "status": "ok", "name": "bob"},
                          cue="Decision:", choices=["yes", "no"]).prefill()
    ip = ctx.edit("status", "no", "in_place")
    n_down = len(ip.cache) - 1 - max(ip.layout.field_slots("status"))
    every = ctx.edit("status", "no", f"selective@{n_down}:random:faithful")
    fresh = nk.KVCache.prefill(ctx.model, every.layout.text)
    assert len(fresh) > 8 * ctx.model.spec.sliding_window
    assert torch.allclose(every.cache.keys, fresh.keys, atol=1e-5)
    assert torch.allclose(every.cache.values, fresh.values, atol=1e-5)
    assert not torch.allclose(ip.cache.keys, fresh.keys, atol=1e-3)  # the downstream was stale before


def test_routing_rules_reproduce_the_routers():
    for arch in MOE:
        m = model_of(arch)
        router = _router(_block(m.hf, m.spec.moe_layers[0]))
        x = torch.randn(40, m.spec.d_model, generator=torch.Generator().manual_seed(2)) * 3
        with torch.no_grad():
            logits, w, idx = router(x)
            w2, idx2 = moe_mod.route(m.spec, router, logits)
        assert torch.equal(w, w2) and torch.equal(idx, idx2), arch
