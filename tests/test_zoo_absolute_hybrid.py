"""GPT-2 (learned absolute positions) and Jamba (Mamba layers interleaved with attention).

Every site, intervention and cache operation either matches a reference computed by hand on
the plain transformers model, or refuses with ``UnsupportedArchitectureError`` /
``UnsupportedError`` / ``SiteError`` naming the family and the reason.
"""

from __future__ import annotations

import pytest
import torch

import notekv as nk
from notekv import Ablate, Knockout, KVPatch, Patch, Steer
from notekv.hooks.positions import Last, Pos
from notekv.hooks.sitemap import UnsupportedError, format_support_table
from notekv.hooks.sites import SiteError
from notekv.kv import KVCache
from notekv.model.arch import UnsupportedArchitectureError

TOL = 1e-5
_models: dict = {}


def tiny(arch: str):
    if arch not in _models:
        _models[arch] = nk.tiny(arch)
    return _models[arch]


def prompts(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two token-id prompts ``[1, n]`` (BOS first) of the byte tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    bos = torch.tensor([[256]])
    return tuple(torch.cat([bos, torch.randint(3, 256, (1, n - 1), generator=gen)], 1) for _ in range(2))


def hf(model, ids, **kw):
    with torch.no_grad():
        return model.hf(input_ids=ids, use_cache=True, **kw)


def hooked_hf(module, kind: str, fn, model, ids, **kw):
    """HF logits with one plain PyTorch hook (``kind``: "pre" or "post") on ``module``."""
    if kind == "pre":
        handle = module.register_forward_pre_hook(fn, with_kwargs=True)
    else:
        handle = module.register_forward_hook(fn)
    try:
        return hf(model, ids, **kw).logits
    finally:
        handle.remove()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err
    return err


# ============================================================================ GPT-2
def gpt2():
    return tiny("gpt2")


def test_gpt2_every_site_matches_hf():
    m = gpt2()
    ids, _ = prompts()
    names = m.sitemap.names()
    assert {"L0.attn.q", "L0.attn.k", "L0.kv.k", "L1.resid_mid"} <= set(names)
    run = m.run(ids, collect=names)
    assert set(names) <= set(run.acts)
    ref = hf(m, ids, output_hidden_states=True)
    close(run.logits, ref.logits)
    hs, n = ref.hidden_states, m.spec.n_layers
    for l in range(n):
        close(run.acts[f"L{l}.resid_pre"], hs[l])
        post = run.acts[f"L{l}.resid_post"]
        close(m.hf.transformer.ln_f(post) if l == n - 1 else post, hs[l + 1])  # HF's last one is after ln_f
        layer = ref.past_key_values.layers[l]
        close(run.acts[f"L{l}.kv.k"], layer.keys)
        close(run.acts[f"L{l}.kv.v"], layer.values)
        close(run.kv.keys[l], layer.keys)
        # No rotation: the query and key the attention reads are the projections themselves.
        assert torch.equal(run.acts[f"L{l}.attn.q"], run.acts[f"L{l}.attn.q_pre"])
        assert torch.equal(run.acts[f"L{l}.attn.k"], run.acts[f"L{l}.attn.k_pre"])
        assert torch.equal(run.acts[f"L{l}.attn.k"], run.acts[f"L{l}.kv.k"])
        # q / k / v by hand: the flat Conv1D c_attn [q | k | v] on ln_1 of the residual.
        blk = m.hf.transformer.h[l]
        qkv = blk.attn.c_attn(blk.ln_1(hs[l]))
        for i, site in enumerate(("attn.q_pre", "attn.k_pre", "attn.v")):
            part = qkv[..., i * 64 : (i + 1) * 64].unflatten(-1, (4, 16)).transpose(1, 2)
            close(run.acts[f"L{l}.{site}"], part)
        q, k = run.acts[f"L{l}.attn.q"], run.acts[f"L{l}.attn.k"]
        scores = (q @ k.transpose(-1, -2)) / 4.0 + torch.full((9, 9), float("-inf")).triu(1)
        close(run.acts[f"L{l}.attn.pattern"], scores.softmax(-1))


def test_gpt2_patch_steer_ablate_against_hand_hooks():
    m = gpt2()
    ids, other = prompts()
    h = m.hf.transformer.h
    # Patch the pre-RoPE key (a slice of the flat c_attn output) at one position.
    src = m.run(other, collect=["L1.attn.k_pre"])
    got = m.run(ids, interventions=[Patch("L1.attn.k_pre", src, at=Pos(4))]).logits
    donor = h[1].attn.c_attn(h[1].ln_1(hf(m, other, output_hidden_states=True).hidden_states[1]))

    def write_k(module, args, out):
        out = out.clone()
        out[:, 4, 64:128] = donor[:, 4, 64:128]
        return out
    close(got, hooked_hf(h[1].attn.c_attn, "post", write_k, m, ids))

    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    got = m.run(ids, interventions=[Steer("L0.attn_out", vec, scale=0.5)]).logits
    close(got, hooked_hf(h[0].attn, "post", lambda mod, a, out: (out[0] + 0.5 * vec,) + tuple(out[1:]), m, ids))

    got = m.run(ids, interventions=[Ablate("L1.attn.z.h2", kind="zero")]).logits

    def zero_head(module, args, kwargs):
        x = args[0].clone()
        x[..., 32:48] = 0
        return (x,) + tuple(args[1:]), kwargs
    close(got, hooked_hf(h[1].attn.c_proj, "pre", zero_head, m, ids))


def _decode_last(m, cache, ids):
    """HF logits of the last token of ``ids`` decoded on ``cache`` at its true position."""
    s = ids.shape[1]
    return hf(m, ids[:, -1:], past_key_values=cache, position_ids=torch.tensor([[s - 1]])).logits[:, -1]


def _cache(layers) -> object:
    from transformers import DynamicCache

    out = DynamicCache()
    for l, (k, v) in enumerate(layers):
        out.update(k.clone(), v.clone(), l)
    return out


def test_gpt2_knockout_and_kv_patch_against_hand_caches():
    m = gpt2()
    ids, other = prompts()
    k = 3
    got = m.run(ids, interventions=[Knockout(src=Pos(k), dst=Last())]).logits[:, -1]
    prefix = hf(m, ids[:, :-1]).past_key_values.layers
    keep = torch.tensor([i for i in range(ids.shape[1] - 1) if i != k])
    dropped = _cache([(l.keys.index_select(2, keep), l.values.index_select(2, keep)) for l in prefix])
    ref = _decode_last(m, dropped, ids)
    close(got, ref)
    assert float((got - m.run(ids).logits[:, -1]).abs().max()) > 1e-3  # the knockout changed something

    old, new = KVCache.prefill(m, ids[:, :-1]), KVCache.prefill(m, other[:, :-1])
    got = m.run(ids[:, -1:], past=old, interventions=[KVPatch(new, at=Pos(k), layers=[1])]).logits[:, -1]
    theirs = hf(m, other[:, :-1]).past_key_values.layers

    def swap(l, layer):
        K, V = layer.keys.clone(), layer.values.clone()
        if l == 1:
            K[:, :, k], V[:, :, k] = theirs[l].keys[:, :, k], theirs[l].values[:, :, k]
        return K, V
    ref = _decode_last(m, _cache([swap(l, layer) for l, layer in enumerate(prefix)]), ids)
    close(got, ref)


def test_gpt2_positions_are_honoured_through_the_position_embedding():
    m = gpt2()
    ids, _ = prompts()
    pos = torch.arange(ids.shape[1])[None] + 40
    ref = hf(m, ids, position_ids=pos)
    close(m.run(ids, positions=40).logits, ref.logits)
    kv = KVCache.prefill(m, ids[:, :-1], offset=40)
    assert kv.positions.tolist() == list(range(40, 48))
    close(kv.keys[0], hf(m, ids[:, :-1], position_ids=pos[:, :-1]).past_key_values.layers[0].keys)
    step = m.run(ids[:, -1:], past=kv)  # continues at position 48
    close(step.logits[:, -1], ref.logits[:, -1])
    # generate continues the moved prefix at its positions (the hook layer's position offset)
    gen = m.generate(ids[:, -1:], past=kv, max_new_tokens=3)
    seq = ids
    for _ in range(3):  # greedy by hand, every forward at positions 40, 41, ...
        logits = hf(m, seq, position_ids=torch.arange(seq.shape[1])[None] + 40).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert gen.new_ids.tolist() == seq[:, ids.shape[1]:].tolist()


def test_gpt2_moving_keys_is_refused():
    m = gpt2()
    ids, _ = prompts()
    kv = KVCache.prefill(m, ids)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*learned absolute position"):
        kv.reposition(3)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*learned absolute position"):
        nk.splice(m, ["a prefix", kv])
    skill = nk.Skill.compile(m, "a policy", mode="isolated")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*learned absolute position"):
        nk.compose(m, "a prefix", [skill], "go", engine="hf")


def test_gpt2_runner_and_attribution_match_per_row_patching():
    from notekv.attribution.exact import exact_kv
    from notekv.runner import KVMix, logit_diff, run_variants

    m = gpt2()
    ids, other = prompts()
    old, new = KVCache.prefill(m, ids[:, :-1]), KVCache.prefill(m, other[:, :-1])
    S = len(old)
    masks = torch.zeros(3, 2, S, dtype=torch.bool)
    masks[0, :, 4] = True
    masks[1, 0, :] = True
    masks[2, 1, 1:] = True
    metric = logit_diff(int(ids[0, 1]), int(ids[0, 2]))
    got = run_variants(m, ids[0, -1:], KVMix.of_slots(new, masks), metric, past=old)
    for row, value in zip(masks, got):
        ivs = [KVPatch(new, at=Pos(torch.nonzero(row[l]).flatten().tolist()), layers=[l]) for l in range(2)
               if bool(row[l].any())]
        ref = metric(m.run(ids[:, -1:], past=old, interventions=ivs).logits[:, -1].float())
        close(value.float(), ref[0].double().float())
    # Attribution in its linear regime (a tiny value perturbation) agrees with exact patching.
    noise = 1e-3 * torch.randn(old.values.shape, generator=torch.Generator().manual_seed(2))
    nudged = KVCache(old.keys, old.values + noise, old.positions, old.token_ids, old.segments, old.fingerprint,
                     old.rope, old.max_positions)
    token, good, bad = int(ids[0, -1]), int(ids[0, 1]), int(ids[0, 2])
    est = nk.attribute_kv(m, old, nudged, token, good, bad).v[0]  # [L, H, S]
    cells = [(l, s, 0) for l in (0, 1) for s in (0, S // 2, S - 1)]
    exact = exact_kv(m, old, nudged, token, good, bad, cells, which="v")
    approx = torch.tensor([float(est[l, h, s]) for l, s, h in cells], dtype=torch.float64)
    assert float((approx - exact).abs().max()) <= 2e-2 * float(exact.abs().max())


def test_gpt2_backends_and_canaries():
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    from notekv.backends.nnsight import NNsightBackend
    from notekv.backends.tl import TLBackend
    from notekv.hooks.canaries import run_canaries

    m = gpt2()
    ids, _ = prompts()
    sites = ["L0.resid_post", "L1.attn.q_pre", "L1.attn.k_pre", "L1.attn.v", "L1.attn.z", "L1.attn.pattern",
             "L1.mlp_out"]
    native = m.run(ids, collect=sites + ["L1.attn.q", "L1.attn.k"])
    tl, nn = TLBackend(m), NNsightBackend(m)
    for backend, names in ((tl, sites), (nn, [s for s in sites if "pattern" not in s] + ["L1.attn.q", "L1.attn.k"])):
        run = backend.run(ids, collect=names)
        for s in names:
            close(run.acts[s], native.acts[s], 1e-4)
        close(run.logits, native.logits, 1e-4)
    with pytest.raises(UnsupportedError, match="gpt2 has no rotary embedding.*attn.q_pre"):
        tl.run(ids, collect=["L1.attn.q"])
    assert run_canaries(m)["decode_max_diff"] < 1e-4


# ============================================================================ Jamba
def jamba():
    return tiny("jamba")


def test_jamba_sites_exist_where_the_layer_kind_has_them():
    m = jamba()
    assert m.spec.attention_layers == (1, 3)
    names = set(m.sitemap.names())
    for l in (0, 2):  # Mamba layers: residual stream, the (MoE) feed-forward
        assert {f"L{l}.resid_pre", f"L{l}.resid_mid", f"L{l}.resid_post", f"L{l}.mlp_out"} <= names
        assert not {n for n in names if n.startswith((f"L{l}.attn", f"L{l}.kv"))}
    for l in (1, 3):
        assert {f"L{l}.attn_out", f"L{l}.attn.q", f"L{l}.attn.pattern", f"L{l}.kv.k"} <= names
    ids, _ = prompts()
    with pytest.raises(SiteError, match="layer 0 of this jamba model is a state-space \\(Mamba\\) layer"):
        m.run(ids, collect=["L0.attn.z"])
    with pytest.raises(SiteError, match="Mamba"):
        m.run(ids, interventions=[Knockout(src=Pos(1), dst=Last(), layers=[2])])
    table = format_support_table(m.spec)  # read where each site exists: attention sites at layer 1
    assert "| `attn.z` | ✓ | ✓ | ✓ |" in table and "| `moe.router` | ✓ |" in table


def test_jamba_every_site_matches_hf():
    m = jamba()
    ids, _ = prompts()
    names = m.sitemap.names()
    run = m.run(ids, collect=names)
    assert set(names) <= set(run.acts)
    ref = hf(m, ids, output_hidden_states=True)
    close(run.logits, ref.logits)
    hs, n = ref.hidden_states, m.spec.n_layers
    for l in range(n):
        close(run.acts[f"L{l}.resid_pre"], hs[l])
        post = run.acts[f"L{l}.resid_post"]
        close(m.hf.model.final_layernorm(post) if l == n - 1 else post, hs[l + 1])
        close(run.acts[f"L{l}.resid_post"], run.acts[f"L{l}.resid_mid"] + run.acts[f"L{l}.mlp_out"])
    for l in (1, 3):
        layer = ref.past_key_values.layers[l]
        close(run.acts[f"L{l}.kv.k"], layer.keys)
        close(run.acts[f"L{l}.kv.v"], layer.values)
        assert torch.equal(run.acts[f"L{l}.attn.q"], run.acts[f"L{l}.attn.q_pre"])  # no positional encoding
        close(run.acts[f"L{l}.resid_mid"], run.acts[f"L{l}.resid_pre"] + run.acts[f"L{l}.attn_out"])
    for l in (0, 2):  # the routed experts' outputs add up to the MoE block's output
        close(run.acts[f"L{l}.moe.experts"].sum(-2), run.acts[f"L{l}.mlp_out"])


def test_jamba_interventions_against_hand_hooks():
    m = jamba()
    ids, other = prompts()
    layers = m.hf.model.layers
    # Patch the residual between the Mamba mixer and the MoE feed-forward of layer 0.
    src = m.run(other, collect=["L0.resid_mid"])
    got = m.run(ids, interventions=[Patch("L0.resid_mid", src, at=Pos(5))]).logits
    donor = src.acts["L0.resid_mid"]

    def write(module, args, kwargs):
        x = args[0].clone()
        x[:, 5] = donor[:, 5]
        return (x,) + tuple(args[1:]), kwargs
    close(got, hooked_hf(layers[0].pre_ff_layernorm, "pre", write, m, ids))

    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    got = m.run(ids, interventions=[Steer("L2.mlp_out", vec, scale=0.5)]).logits
    close(got, hooked_hf(layers[2].feed_forward, "post", lambda mod, a, out: out + 0.5 * vec, m, ids))

    got = m.run(ids, interventions=[Ablate("L3.attn.z.h1", kind="zero")]).logits

    def zero_head(module, args, kwargs):
        x = args[0].clone()
        x[..., 16:32] = 0
        return (x,) + tuple(args[1:]), kwargs
    close(got, hooked_hf(layers[3].self_attn.o_proj, "pre", zero_head, m, ids))


def test_jamba_knockout_covers_the_attention_layers():
    m = jamba()
    ids, _ = prompts()
    k, s = 3, ids.shape[1]
    got = m.run(ids, interventions=[Knockout(src=Pos(k), dst=Last())]).logits  # "all": layers 1 and 3
    mask = torch.full((s, s), float("-inf")).triu(1)
    mask[-1, k] = float("-inf")
    ref = hf(m, ids, attention_mask={"full_attention": mask[None, None], "linear_attention": None}).logits
    close(got, ref)
    assert float((got[:, -1] - m.run(ids).logits[:, -1]).abs().max()) > 1e-3


def test_jamba_cache_decode_and_refusals():
    m = jamba()
    ids, other = prompts()
    full = m.run(ids)
    prefix = m.run(ids[:, :-1])
    states = [t.clone() for t in prefix.hf_cache.layers[0].recurrent_states.values()]
    step = m.run(ids[:, -1:], past=prefix)
    close(step.logits[:, -1], full.logits[:, -1])
    again = m.run(ids[:, -1:], past=prefix.hf_cache)  # the transformers cache itself: the same
    assert torch.equal(again.logits, step.logits)
    assert all(torch.equal(a, b) for a, b in zip(states, prefix.hf_cache.layers[0].recurrent_states.values()))
    # No positional encoding: a prompt placed at other positions computes the same thing.
    assert torch.equal(m.run(ids, positions=40).logits, full.logits)
    why = "jamba.*state-space \\(Mamba\\).*recurrent state"
    with pytest.raises(UnsupportedArchitectureError, match=why):
        full.kv
    with pytest.raises(UnsupportedArchitectureError, match=why):
        KVCache.prefill(m, ids)
    with pytest.raises(UnsupportedArchitectureError, match=why):
        m.run(ids, interventions=[KVPatch(m.run(other), at=Pos(2))])
    with pytest.raises(UnsupportedArchitectureError, match=why):
        nk.splice(m, ["a prefix", "more text"])
    with pytest.raises(UnsupportedArchitectureError, match=why):
        nk.compose(m, "a prefix", [], "go")
    with pytest.raises(UnsupportedArchitectureError, match=why):
        m.generate(ids[:, -1:], past=prefix, max_new_tokens=2)
    gen = m.generate(ids, max_new_tokens=3)
    assert gen.kv is None
    seq = ids
    for _ in range(3):
        seq = torch.cat([seq, hf(m, seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert gen.new_ids.tolist() == seq[:, ids.shape[1]:].tolist()


def test_jamba_batched_rows_and_canaries():
    from notekv.hooks.canaries import run_canaries
    from notekv.runner import RowInterventions, logit_diff, run_variants

    m = jamba()
    ids, _ = prompts()
    metric = logit_diff(int(ids[0, 1]), int(ids[0, 2]))
    ablate = [Ablate("L1.attn.z", kind="zero")]
    got = run_variants(m, ids[0], RowInterventions(2, lambda rows: ablate), metric)  # one batch of 2 rows
    ref = metric(m.run(ids, interventions=ablate).logits[:, -1].float())
    close(got.float(), ref.double().float().expand(2))
    plain = metric(m.run(ids).logits[:, -1].float())
    assert float((ref - plain).abs()) > 1e-4  # the ablation changed the metric
    assert run_canaries(m)["decode_max_diff"] < 1e-4


def test_jamba_backends():
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    from notekv.backends.nnsight import NNsightBackend
    from notekv.backends.tl import TLBackend

    m = jamba()
    ids, _ = prompts()
    sites = ["L0.resid_post", "L0.mlp_out", "L1.attn.q_pre", "L1.attn.k_pre", "L1.attn.v", "L1.attn.z",
             "L3.attn_out", "L3.mlp_out"]
    native = m.run(ids, collect=sites)
    for backend in (TLBackend(m), NNsightBackend(m)):
        run = backend.run(ids, collect=sites)
        for s in sites:
            close(run.acts[s], native.acts[s], 1e-4)
        close(run.logits, native.logits, 1e-4)
        with pytest.raises((UnsupportedError, SiteError), match="Mamba"):
            backend.run(ids, collect=["L2.attn.z"])
