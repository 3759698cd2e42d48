"""Dense families with their own twists, on tiny random models, against plain HF forwards.

Gemma-2 (soft-caps, sliding/global layers), Phi-3 (flat fused QKV, LongRoPE), OLMo-2
(post-norms only, whole-projection QK-norm), Cohere (parallel block, interleaved RoPE,
logit_scale), Cohere-2 (sliding RoPE layers and global NoPE layers), Granite (multipliers),
SmolLM3 (NoPE layers), StableLM (partial rotary, per-head QK LayerNorm), Phi (parallel
block, partial rotary, QK LayerNorm) and Starcoder2 (a sliding window on every layer).
Every reference is computed on the HF model alone: its hidden states and cache, plain
PyTorch hooks, hand-built caches and explicit position ids.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import DynamicCache

import notekv as nk
from notekv.hooks.sitemap import UnsupportedError
from notekv.kv.rope import UnsupportedRopeError, layer_specs, rotate
from notekv.model.arch import UnsupportedArchitectureError, arch_spec, get_submodule
from notekv.model.attnmath import scaling_of, softcap, visible

ARCHS = ["gemma2", "phi3", "olmo2", "cohere", "cohere2", "granite", "smollm3", "stablelm", "phi", "starcoder2"]
TEXT = "order_status: shipped. Refund request: please decide now."  # 57 tokens + BOS: past every window
TOL = 1e-5  # relative, float32 on both sides

_models: dict = {}


def model_of(arch: str, **overrides):
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _models:
        _models[key] = nk.tiny(arch, **overrides)
    return _models[key]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def seeded() -> tuple[int, torch.Generator]:
    seed = random.SystemRandom().randrange(2**31)
    return seed, torch.Generator().manual_seed(seed)


def hf_forward(m, ids: torch.Tensor, **kw):
    with torch.no_grad():
        return m.hf(input_ids=ids, use_cache=True, **kw)


def short_ids(m, gen: torch.Generator, n: int = 7) -> torch.Tensor:
    """A BOS-led prompt shorter than every sliding window (HF's sliding cache keeps it all)."""
    return torch.cat([torch.tensor([[m.tokenizer.bos_token_id]]), torch.randint(3, 256, (1, n - 1), generator=gen)], 1)


def layer(m, l: int):
    return get_submodule(m.hf, f"{m.spec.layout.layers}.{l}")


def residual_multiplier(m) -> float:
    field = m.spec.layout.residual_multiplier
    return float(getattr(m.hf.config, field)) if field else 1.0


# ---------------------------------------------------------------------- the facts
def test_family_facts():
    assert model_of("gemma2").spec.attn_logit_softcap == 0.3 and model_of("gemma2").spec.final_logit_softcap == 1.0
    assert [r.rotary_dim for r in model_of("cohere2").spec.rope] == [16, 16, 0]
    assert {r.pairing for r in model_of("cohere").spec.rope} == {"interleaved"}
    assert [r.rotary_dim for r in model_of("smollm3").spec.rope] == [16, 0, 16, 0]
    assert [r.rotary_dim for r in model_of("stablelm").spec.rope] == [4, 4]
    assert [r.rotary_dim for r in model_of("phi").spec.rope] == [8, 8]
    assert model_of("starcoder2").spec.window_of(1) == 8 and model_of("gemma2").spec.window_of(1) is None
    phi3 = model_of("phi3").spec.rope[0]
    assert (phi3.rope_type, phi3.switch_at) == ("longrope", 2048) and phi3.attention_factor > 1
    assert model_of("olmo2").spec.layout.resid_mid == "mlp"
    assert model_of("granite").spec.layout.embed_multiplier == "embedding_multiplier"
    for arch in ("cohere", "cohere2", "phi"):
        assert model_of(arch).spec.layout.resid_mid is None


@pytest.mark.parametrize("arch, overrides, resid_mid, q_norm", [
    ("stablelm", dict(use_parallel_residual=True, qk_layernorm=False), None, None),
    ("cohere", dict(use_qk_norm=False), None, None),
    ("phi", dict(qk_layernorm=False), None, None),
])
def test_config_switches_resolve_the_row(arch, overrides, resid_mid, q_norm):
    m = model_of(arch, **overrides)
    assert (m.spec.layout.resid_mid, m.spec.layout.q_norm) == (resid_mid, q_norm)
    check_sites(m)


# ---------------------------------------------------------------------- 1. sites
def check_sites(m) -> None:
    spec, lay = m.spec, m.spec.layout
    names = m.sitemap.names()
    run = m.run(TEXT, collect=names)
    ids = run.ids
    S = ids.shape[1]
    ref = hf_forward(m, ids, output_hidden_states=True)
    hs = ref.hidden_states
    assert rel(run.logits, ref.logits) <= TOL
    assert torch.equal(run["logits"], run.logits)
    final_norm = get_submodule(m.hf, lay.final_norm)
    mult = residual_multiplier(m)
    pos = torch.arange(S)
    for l in range(spec.n_layers):
        a = lambda s: run[f"L{l}.{s}"]  # noqa: E731
        assert rel(a("resid_pre"), hs[l]) <= TOL, l
        post = a("resid_post") if l < spec.n_layers - 1 else final_norm(a("resid_post"))
        assert rel(post, hs[l + 1]) <= TOL, l
        # what the block adds (Granite scales it by its residual multiplier)
        assert rel(a("resid_pre") + mult * (a("attn_out") + a("mlp_out")), a("resid_post")) <= TOL, l
        if lay.resid_mid is not None:
            assert rel(a("resid_pre") + mult * a("attn_out"), a("resid_mid")) <= TOL, l
        # the cache: the model's own, whole (HF's sliding layers keep a tail), and attn.k is it
        hf_k, hf_v = ref.past_key_values.layers[l].keys, ref.past_key_values.layers[l].values
        n = hf_k.shape[2]
        # (notekv's eager attention for the attention sites vs the model's SDPA: rounding only)
        assert rel(a("kv.k")[..., -n:, :], hf_k) <= TOL and rel(a("kv.v")[..., -n:, :], hf_v) <= TOL, l
        assert torch.equal(a("attn.k"), a("kv.k")) and torch.equal(run.kv.keys[l], a("kv.k"))
        # the layer's RoPE facts turn the pre-RoPE key and query into HF's
        rope = spec.rope[l]
        turned = lambda x: rotate(x, pos, layer_specs(spec)[l]) * rope.attention_factor  # noqa: E731
        assert rel(turned(a("attn.k_pre")), a("attn.k")) <= TOL, l
        assert rel(turned(a("attn.q_pre")), a("attn.q")) <= TOL, l
        # notekv's attention: scale, cap, mask, softmax, values
        attn = get_submodule(layer(m, l), lay.attn)
        k_rep = a("attn.k").repeat_interleave(spec.group_size, 1)
        v_rep = a("attn.v").repeat_interleave(spec.group_size, 1)
        want = softcap(a("attn.q") @ k_rep.transpose(-1, -2) * scaling_of(attn, spec), spec.attn_logit_softcap)
        ok = visible(pos, pos, spec.window_of(l))
        assert rel(a("attn.scores")[..., ok], want[..., ok]) <= TOL, l
        assert torch.all(a("attn.pattern")[..., ~ok] == 0)
        assert rel(a("attn.pattern") @ v_rep, a("attn.z")) <= TOL, l
    scale = getattr(m.hf.config, lay.embed_multiplier) if lay.embed_multiplier else 1.0  # Granite: 3
    assert rel(run["embed"] * scale, hs[0]) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_match_hf(arch):
    check_sites(model_of(arch))


def test_soft_caps_bite():
    """The caps change the numbers (the site check above would pass without them otherwise)."""
    m = model_of("gemma2")
    run = m.run(TEXT, collect=["L1.attn.q", "L1.attn.k", "L1.attn.scores"])
    raw = run["L1.attn.q"] @ run["L1.attn.k"].repeat_interleave(2, 1).transpose(-1, -2) * 24 ** -0.5
    ok = visible(torch.arange(raw.shape[-1]), torch.arange(raw.shape[-1]))
    assert raw[..., ok].abs().max() > 0.33 and run["L1.attn.scores"][..., ok].abs().max() < 0.3
    uncapped = nk.tiny("gemma2", final_logit_softcapping=None).run(TEXT).logits
    assert uncapped.abs().max() > 1.2 and run.logits.abs().max() < 1.0


def test_flat_qkv_slices_are_the_fused_projection():
    m = model_of("phi3")
    spec = m.spec
    run = m.run(TEXT, collect=["L0.attn.q_pre", "L0.attn.k_pre", "L0.attn.v", "L0.resid_pre"])
    attn = get_submodule(layer(m, 0), spec.layout.attn)
    x = layer(m, 0).input_layernorm(run["L0.resid_pre"])
    qkv = attn.qkv_proj(x)
    d, hq, hk = spec.head_dim, spec.n_heads, spec.n_kv_heads
    parts = qkv.split([hq * d, hk * d, hk * d], -1)
    for got, part, h in zip(("attn.q_pre", "attn.k_pre", "attn.v"), parts, (hq, hk, hk)):
        assert torch.equal(run[f"L0.{got}"], part.view(1, -1, h, d).transpose(1, 2))


# ---------------------------------------------------------------------- 2. interventions
def _with_hooks(m, ids, hooks):
    handles = [mod.register_forward_pre_hook(fn, with_kwargs=True) if pre else mod.register_forward_hook(fn)
               for mod, fn, pre in hooks]
    try:
        return hf_forward(m, ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_interventions_match_hand_references(arch):
    m = model_of(arch)
    spec, lay = m.spec, m.spec.layout
    seed, gen = seeded()
    ids = m.tokenize(TEXT).ids
    ids = torch.tensor([ids])
    other = ids.clone()
    other[0, 1:] = torch.randint(3, 256, (ids.shape[1] - 1,), generator=gen)
    S, L = ids.shape[1], spec.n_layers
    j = int(torch.randint(1, S, (1,), generator=gen))
    msg = f"seed {seed}, position {j}"

    # Patch resid_pre of the last layer at j
    src = m.run(other, collect=[f"L{L - 1}.resid_pre"])
    donor = hf_forward(m, other, output_hidden_states=True).hidden_states[L - 1]

    def pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, j] = donor[:, j]
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    got = m.run(ids, interventions=[nk.Patch(f"L{L - 1}.resid_pre", src, at=nk.Pos(j))]).logits
    assert rel(got, _with_hooks(m, ids, [(layer(m, L - 1), pre, True)])) <= TOL, msg

    # Steer mlp_out (a post-norm's output on Gemma-2 / OLMo-2) and attn_out
    vec = torch.randn(spec.d_model, generator=gen)

    def add(module, args, out):
        return (out[0] + 0.5 * vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + 0.5 * vec

    for name, path in (("mlp_out", lay.mlp_out), ("attn_out", lay.attn_out)):
        got = m.run(ids, interventions=[nk.Steer(f"L0.{name}", vec, scale=0.5)]).logits
        ref = _with_hooks(m, ids, [(get_submodule(layer(m, 0), path), add, False)])
        assert rel(got, ref) <= TOL, (name, msg)

    # Ablate one query head of attn.z: zero that head's slice of the output projection's input
    h, d = spec.n_heads - 1, spec.head_dim

    def zero(module, args, kwargs):
        x = args[0].clone()
        x[..., h * d : (h + 1) * d] = 0
        return (x,) + tuple(args[1:]), kwargs

    got = m.run(ids, interventions=[nk.Ablate(f"L0.attn.z.h{h}", kind="zero")]).logits
    o_proj = get_submodule(layer(m, 0), f"{lay.attn}.{lay.o_proj}")
    assert rel(got, _with_hooks(m, ids, [(o_proj, zero, True)])) <= TOL, msg

    # Patch the logits site: what the model returns (after Gemma-2's cap, Cohere's and Granite's scales)
    fake = torch.randn(1, S, spec.vocab_size, generator=gen)
    got = m.run(ids, interventions=[nk.Patch("logits", fake, at=nk.Pos(j))]).logits
    ref = hf_forward(m, ids).logits.clone()
    ref[:, j] = fake[:, j]
    assert rel(got, ref) <= TOL, msg


def _decode_last(m, cache, ids: torch.Tensor) -> torch.Tensor:
    s = ids.shape[1]
    with torch.no_grad():
        out = m.hf(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[s - 1]]))
    return out.logits[:, -1]


def _cache_of(layers_kv) -> DynamicCache:
    out = DynamicCache()
    for l, (k, v) in enumerate(layers_kv):
        out.update(k.clone(), v.clone(), l)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_knockout_and_kv_patch_match_hand_built_caches(arch):
    m = model_of(arch)
    seed, gen = seeded()
    ids, other = short_ids(m, gen), short_ids(m, gen)
    k = 1 + int(torch.randint(0, ids.shape[1] - 2, (1,), generator=gen))
    msg = f"seed {seed}, slot {k}"
    a = hf_forward(m, ids[:, :-1]).past_key_values.layers
    b = hf_forward(m, other[:, :-1]).past_key_values.layers

    got = m.run(ids, interventions=[nk.Knockout(src=nk.Pos(k), dst=nk.Last())]).logits[:, -1]
    keep = torch.tensor([i for i in range(ids.shape[1] - 1) if i != k])
    ref = _decode_last(m, _cache_of([(x.keys.index_select(2, keep), x.values.index_select(2, keep)) for x in a]), ids)
    assert rel(got, ref) <= TOL, msg

    old, new = nk.KVCache.prefill(m, ids[:, :-1]), nk.KVCache.prefill(m, other[:, :-1])
    got = m.run(ids[:, -1:], past=old, interventions=[nk.KVPatch(new, at=nk.Pos(k))]).logits[:, -1]
    swapped = []
    for x, y in zip(a, b):
        K, V = x.keys.clone(), x.values.clone()
        K[:, :, k], V[:, :, k] = y.keys[:, :, k], y.values[:, :, k]
        swapped.append((K, V))
    assert rel(got, _decode_last(m, _cache_of(swapped), ids)) <= TOL, msg


# ---------------------------------------------------------------------- 3. shift invariance
@pytest.mark.parametrize("arch", ARCHS)
def test_shift_invariance(arch):
    m = model_of(arch)
    seed, gen = seeded()
    n = len(m.tokenize(TEXT))
    # The model's own rotary rounds position x frequency to float32: the keys of a prefill at
    # offset d carry an error of about 1.3e-8 * d relative (any family, Llama included), so up
    # to d = 512 what is measured against TOL is notekv's rotation. (LongRoPE switches at 2048.)
    top = min(512, (m.spec.rope[0].switch_at or 10**9) - n)
    d = int(torch.randint(1, top, (1,), generator=gen))
    at_d = nk.KVCache.prefill(m, TEXT, offset=d)
    moved, base = at_d.reposition(-d), nk.KVCache.prefill(m, TEXT)
    assert torch.equal(moved.positions, base.positions)
    for l, r in enumerate(m.spec.rope):
        assert rel(moved.keys[l], base.keys[l]) <= TOL, f"seed {seed}, shift {d}, layer {l}"
        assert rel(moved.values[l], base.values[l]) <= TOL, f"seed {seed}, shift {d}, layer {l}"
        if r.rotary_dim == 0:  # NoPE: the move leaves the keys as computed
            assert torch.equal(moved.keys[l], at_d.keys[l])
        else:  # the check can fail: before the move the keys differ
            assert rel(at_d.keys[l], base.keys[l]) > 1e-3, f"seed {seed}, shift {d}, layer {l}"


def test_longrope_regimes():
    m = model_of("phi3")
    switch = m.spec.rope[0].switch_at
    ids = m.tokenize(TEXT).ids
    n = len(ids)
    # past the switch the model runs its long factors; notekv's sites are still the model's own
    run = m.run(TEXT, positions=switch, collect=["L1.kv.k", "L1.resid_post"])
    with torch.no_grad():
        ref = m.hf(input_ids=run.ids, position_ids=torch.arange(switch, switch + n)[None], use_cache=True)
    assert rel(run.logits, ref.logits) <= TOL
    assert torch.equal(run["L1.kv.k"], ref.past_key_values.layers[1].keys)
    # the facts keep the short factors although the rotary module now holds the long ones
    rotary = get_submodule(m.hf, m.spec.layout.rotary)
    assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    assert arch_spec(m.hf).rope == m.spec.rope
    # keys computed past the switch, or moves onto it, are refused with the reason
    long_keys = nk.KVCache.prefill(m, TEXT, offset=switch - n + 1)
    with pytest.raises(UnsupportedRopeError, match="phi3.*LongRoPE"):
        long_keys.reposition(-(switch - n + 1))
    short_keys = nk.KVCache.prefill(m, TEXT, offset=switch - n)
    assert isinstance(UnsupportedRopeError("x"), UnsupportedArchitectureError)
    with pytest.raises(UnsupportedRopeError, match="LongRoPE"):
        short_keys.reposition(1)
    # (the model's float32 rotary at position ~2000 rounds to ~2e-5 itself: as test_kv's large shifts)
    assert rel(short_keys.reposition(-(switch - n)).keys, nk.KVCache.prefill(m, TEXT).keys) <= 1e-4
    with pytest.raises(UnsupportedRopeError, match="LongRoPE"):
        nk.splice(m, [long_keys, "more"])


# ---------------------------------------------------------------------- 4. splice and compose
@pytest.mark.parametrize("arch", ARCHS)
def test_splice_and_compose_are_exact_without_seams(arch):
    m = model_of(arch)
    head = nk.KVCache.prefill(m, TEXT)
    joined = nk.splice(m, [head, " and then some"])
    full = nk.KVCache.prefill(m, joined.token_ids[None])
    assert rel(joined.keys, full.keys) <= TOL and rel(joined.values, full.values) <= TOL
    chunk_ids = torch.tensor([m.tokenize(" a chunk").ids[1:]])  # no BOS: it lands mid-context
    chunk = nk.KVCache.prefill(m, chunk_ids)
    moved = nk.splice(m, [TEXT, chunk])
    n = len(moved) - len(chunk)
    landed = nk.KVCache.prefill(m, chunk_ids, offset=n)
    assert rel(moved.keys[..., n:, :], landed.keys) <= TOL and rel(moved.values[..., n:, :], landed.values) <= TOL

    skill = nk.Skill.compile(m, " be brief", mode="isolated", name="brief")
    suffix = m.tokenize(" ok?").ids[1:]
    got = nk.compose(m, head, [skill], suffix, logits="last", engine="hf")
    ref = m.run(torch.tensor([suffix]), past=nk.splice(m, [head, skill.cache]), logits="last").logits[:, -1]
    logits = got.logits[:, -1] if got.logits.dim() == 3 else got.logits
    assert rel(logits, ref) <= TOL


# ---------------------------------------------------------------------- 5. runner and attribution
@pytest.mark.parametrize("arch", ARCHS)
def test_runner_and_attribution(arch):
    from notekv.attribution.exact import exact_kv
    from notekv.runner import KVMix, logit_diff, run_variants

    m = model_of(arch)
    seed, gen = seeded()
    ids, other = short_ids(m, gen), short_ids(m, gen)
    old, new = nk.KVCache.prefill(m, ids[:, :-1]), nk.KVCache.prefill(m, other[:, :-1])
    L, S = m.spec.n_layers, len(old)
    masks = torch.zeros(3, L, S, dtype=torch.bool)
    masks[0, :, S // 2] = True
    masks[1, 0, :] = True
    masks[2, L - 1, 1:] = True
    good, bad = int(ids[0, 1]), int(ids[0, 2]) if int(ids[0, 2]) != int(ids[0, 1]) else int(ids[0, 1]) + 1
    metric = logit_diff(good, bad)
    got = run_variants(m, ids[0, -1:], KVMix.of_slots(new, masks), metric, past=old, method="hooks")
    for row, value in zip(masks, got):
        ivs = [nk.KVPatch(new, at=nk.Pos(torch.nonzero(row[l]).flatten().tolist()), layers=[l])
               for l in range(L) if bool(row[l].any())]
        ref = float(metric(m.run(ids[:, -1:], past=old, interventions=ivs).logits[:, -1].float())[0])
        assert abs(float(value) - ref) <= TOL * max(1.0, abs(ref)), f"seed {seed}"

    # attribution in its linear regime equals the exact first-order effect of the same cells
    # (the central difference of exact patching at +/- a small perturbation cancels the
    # second-order term; post-norm families such as OLMo-2 curve too much for a one-sided one)
    noise = torch.randn(old.values.shape, generator=gen) * old.values.abs().mean()
    eps = 3e-3
    plus = dataclasses.replace(old, values=old.values + eps * noise)
    minus = dataclasses.replace(old, values=old.values - eps * noise)
    est = nk.attribute_kv(m, old, plus, int(ids[0, -1]), good, bad).v[0]  # [L, H, S]
    cells = [(l, s, 0) for l in (0, L - 1) for s in (0, S // 2, S - 1)]
    exact = (exact_kv(m, old, plus, int(ids[0, -1]), good, bad, cells, which="v")
             - exact_kv(m, old, minus, int(ids[0, -1]), good, bad, cells, which="v")) / 2
    approx = torch.tensor([float(est[l, h, s]) for l, s, h in cells], dtype=torch.float64)
    assert rel(approx, exact) <= 2e-2, f"seed {seed}"


# ---------------------------------------------------------------------- 6. backends
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["tl", "nnsight"])
def test_backends_agree_or_refuse(arch, kind):
    """Every site the backend reaches equals model.run's; every other one (and a backend that
    cannot be built) is refused with UnsupportedError naming the family's reason."""
    from notekv.hooks.sites import site

    m = model_of(arch)
    if kind == "tl":
        from notekv.backends.tl import TLBackend as Backend
    else:
        from notekv.backends.nnsight import NNsightBackend as Backend
    try:
        backend = Backend(m)
    except UnsupportedError as refusal:
        assert arch in str(refusal), refusal
        assert (arch, kind) in EXPECTED_BACKEND_REFUSALS, refusal
        return
    reached = []
    for name in m.sitemap.names("native"):
        if ".kv." in name:
            continue
        try:
            (backend.hook_name if kind == "tl" else backend.access_of)(site(name))
            reached.append(name)
        except UnsupportedError as refusal:
            assert "not supported by" in str(refusal), refusal
    assert "L0.resid_post" in reached and "L0.attn.v" in reached
    native = m.run(TEXT, collect=reached)
    run = backend.run(TEXT, collect=reached)
    for name in reached:
        assert rel(run[name], native[name]) <= 1e-4, name
    assert rel(run.logits, native.logits) <= 1e-4


#: Backends that cannot be built on a family at all.
EXPECTED_BACKEND_REFUSALS = {("phi", "tl")}  # TransformerLens 4.3's Phi adapter refuses its QK LayerNorm
