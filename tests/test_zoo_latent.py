"""Latent attention (DeepSeek-V2/V3 MLA) and multimodal RoPE (Qwen2.5-VL, text path) on tiny models.

Every check compares notekv against a reference computed by hand on the plain transformers
model (its own forward, hidden states, cache and modules). Shift offsets are drawn at random
per run; the seed is in every assertion message.
"""

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import notekv as nk
from notekv.capabilities import SHIFT_RANGE
from notekv.hooks.sitemap import UnsupportedError
from notekv.hooks.sites import SiteError
from notekv.kv import KVCache
from notekv.runner import KVMix, logit_diff, run_variants

MLA = ["deepseek_v2", "deepseek_v3"]
ARCHS = MLA + ["qwen2_5_vl"]
TEXT = "order_status: shipped. Refund request: granted? Let us see."
SEED = random.SystemRandom().randrange(1 << 31)
RNG = random.Random(SEED)
# HF forms RoPE angles as float32 position * frequency, so its own keys at position p carry
# ~p * 6e-8 rad of rounding; below ~1000 that stays under the 1e-5 the shift test asks.
MAX_SHIFT = SHIFT_RANGE  # float32 RoPE of the model itself drifts past 1e-5 beyond ~1k positions

_models: dict[str, nk.HookedModel] = {}


def model(arch: str) -> nk.HookedModel:
    if arch not in _models:
        _models[arch] = nk.tiny(arch)
    return _models[arch]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def sub(m, path: str) -> torch.nn.Module:
    return m.hf.get_submodule(path)


def attn(m, layer: int) -> torch.nn.Module:
    return sub(m, f"{m.spec.layout.layers}.{layer}.{m.spec.layout.attn}")


def hf_kv(m, cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-head K/V of a cache the plain model filled: MLA caches a latent and expands it with
    its attention module's expand_kv on every forward; the others cache K/V."""
    keys, values = [], []
    for l, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if m.spec.layout.kv_expand:
            module = attn(m, l)
            k, v = type(module).expand_kv(module, k, v)
        keys.append(k)
        values.append(v)
    return keys, values


def hf_forward(m, ids, *, hooks=(), **kw):
    """The plain model's forward with hand-made torch hooks ``(module, kind, fn)``."""
    handles = []
    for module, kind, fn in hooks:
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return m.hf(input_ids=ids, use_cache=True, **kw)
    finally:
        for h in handles:
            h.remove()


def first(output):
    return output[0] if isinstance(output, tuple) else output


def with_first(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


# ---------------------------------------------------------------------------- sites
@pytest.mark.parametrize("arch", ARCHS)
def test_sites_equal_the_models_own_values(arch):
    m = model(arch)
    spec = m.spec
    ids = m.to_tokens(TEXT)
    B, S, L, H = 1, ids.shape[1], spec.n_layers, spec.n_heads
    z_in, q_pre = {}, {}
    hooks = [(sub(m, f"{spec.layout.layers}.{l}.{spec.layout.attn}.{spec.layout.o_proj}"), "pre",
              (lambda l: lambda mod, a, k: z_in.__setitem__(l, a[0].clone()))(l)) for l in range(L)]
    hooks += [(sub(m, f"{spec.layout.layers}.{l}.{spec.layout.attn}.{spec.layout.q_proj}"), "out",
               (lambda l: lambda mod, a, o: q_pre.__setitem__(l, o.clone()))(l)) for l in range(L)]
    out = hf_forward(m, ids, hooks=hooks, output_hidden_states=True)
    hk, hv = hf_kv(m, out.past_key_values)
    plain = [f"L{l}.{s}" for l in range(L) for s in ("resid_post", "attn.k", "attn.v", "attn.z", "attn.q_pre",
                                                     "kv.k", "kv.v")]
    run = m.run(ids, collect=plain + ["embed", "logits"])  # no attention internals: the model's own kernel runs
    assert torch.equal(run.logits, out.logits) and torch.equal(run["logits"], out.logits)
    assert torch.equal(run["embed"], out.hidden_states[0])
    norm = sub(m, spec.layout.final_norm)
    for l in range(L):
        rp = run[f"L{l}.resid_post"]
        assert torch.equal(norm(rp) if l == L - 1 else rp, out.hidden_states[l + 1]), (arch, l)
        assert torch.equal(run[f"L{l}.kv.k"], hk[l]) and torch.equal(run[f"L{l}.kv.v"], hv[l]), (arch, l)
        assert torch.equal(run.kv.keys[l], hk[l]) and torch.equal(run.kv.values[l], hv[l]), (arch, l)
        assert torch.equal(run[f"L{l}.attn.k"], hk[l]) and torch.equal(run[f"L{l}.attn.v"], hv[l])
        assert torch.equal(run[f"L{l}.attn.z"], z_in[l].view(B, S, H, -1).transpose(1, 2))
        assert torch.equal(run[f"L{l}.attn.q_pre"], q_pre[l].view(B, S, H, -1).transpose(1, 2))
    assert run.kv.keys.shape == (L, B, spec.n_kv_heads, S, spec.head_dim)
    assert run.kv.values.shape == (L, B, spec.n_kv_heads, S, spec.v_dim)
    if arch in MLA:  # K: qk_nope + qk_rope dims; V: v_head_dim, a different size
        cfg = m.hf.config
        assert (spec.head_dim, spec.v_dim) == (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim)
        assert spec.head_dim != spec.v_dim
        # the rotary part (the last qk_rope dims) is one key shared by every head
        rope = run.kv.keys[..., cfg.qk_nope_head_dim:]
        assert torch.equal(rope, rope[:, :, :1].expand_as(rope))
        assert not torch.equal(run.kv.keys[:, :, 0], run.kv.keys[:, :, 1])

    # Every site of the site map, attention internals included (notekv's eager attention).
    names = m.sitemap.names()
    full = m.run(ids, collect=names)
    assert set(names) <= set(full.acts) | {"logits"}
    assert rel(full.logits, out.logits) < 1e-5
    for l in range(L):
        q, k, v = full[f"L{l}.attn.q"], full[f"L{l}.kv.k"], full[f"L{l}.kv.v"]
        assert q.shape == (B, H, S, spec.head_dim) and full[f"L{l}.attn.z"].shape == (B, H, S, spec.v_dim)
        groups = H // spec.n_kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        causal = torch.full((S, S), float("-inf")).triu(1)
        scores = q @ k.transpose(-1, -2) * attn(m, l).scaling + causal
        seen = causal == 0
        assert rel(full[f"L{l}.attn.scores"][..., seen], scores[..., seen]) < 1e-5, (arch, l)
        assert rel(full[f"L{l}.attn.pattern"], torch.softmax(scores, -1)) < 1e-5, (arch, l)
        assert rel(full[f"L{l}.attn.z"], full[f"L{l}.attn.pattern"] @ v) < 1e-5, (arch, l)


@pytest.mark.parametrize("arch", MLA)
def test_latent_attention_has_no_per_head_pre_rope_key(arch):
    m = model(arch)
    assert "L0.attn.k_pre" not in m.sitemap.names()
    with pytest.raises(SiteError, match=f"{arch} uses latent attention"):
        m.run("hi", collect=["L0.attn.k_pre"])


def test_qwen2_5_vl_pre_rope_key_is_k_proj():
    m = model("qwen2_5_vl")
    ids = m.to_tokens(TEXT)
    got = {}
    hook = (attn(m, 1).k_proj, "out", lambda mod, a, o: got.__setitem__("k", o.clone()))
    hf_forward(m, ids, hooks=[hook])
    run = m.run(ids, collect=["L1.attn.k_pre"])
    assert torch.equal(run["L1.attn.k_pre"], got["k"].view(1, ids.shape[1], m.spec.n_kv_heads, -1).transpose(1, 2))


# ---------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("arch", ARCHS)
def test_interventions_match_hand_references(arch):
    m = model(arch)
    spec = m.spec
    layers = sub(m, spec.layout.layers)
    ids = m.to_tokens(TEXT)
    S = ids.shape[1]
    clean_ids = ids.clone()
    clean_ids[0, 3] = (ids[0, 3] + 7) % 256
    g = torch.Generator().manual_seed(SEED)

    # Steer: add a vector to resid_post of layer 1.
    vec = torch.randn(spec.d_model, generator=g)
    got = m.run(ids, interventions=[nk.Steer("L1.resid_post", vec)]).logits
    ref = hf_forward(m, ids, hooks=[(layers[1], "out", lambda mod, a, o: with_first(o, first(o) + vec))]).logits
    assert rel(got, ref) < 1e-6 and rel(got, m.run(ids).logits) > 1e-3, SEED

    # Ablate one head of attn.z (the o_proj input, V's head size per head).
    dv = spec.v_dim

    def zero_head(mod, a, k):
        x = a[0].clone()
        x[..., 2 * dv:3 * dv] = 0
        return (x,) + a[1:], k
    got = m.run(ids, interventions=[nk.Ablate("L1.attn.z.h2")]).logits
    ref = hf_forward(m, ids, hooks=[(sub(m, f"{spec.layout.layers}.1.{spec.layout.attn}.{spec.layout.o_proj}"),
                                     "pre", zero_head)]).logits
    assert rel(got, ref) < 1e-6 and rel(got, m.run(ids).logits) > 1e-4

    # Patch resid_post of layer 0 at slot 5 from the clean run.
    clean = m.run(clean_ids, collect=["L0.resid_post"])
    got = m.run(ids, interventions=[nk.Patch("L0.resid_post", clean, at=nk.Pos(5))]).logits

    def put(mod, a, o):
        x = first(o).clone()
        x[:, 5] = clean["L0.resid_post"][:, 5]
        return with_first(o, x)
    ref = hf_forward(m, ids, hooks=[(layers[0], "out", put)]).logits
    assert rel(got, ref) < 1e-6 and rel(got, m.run(ids).logits) > 1e-4

    # Knockout: the last query may not read slot 3, in every layer.
    got = m.run(ids, interventions=[nk.Knockout(src=nk.Pos(3), dst=nk.Last())]).logits
    mask = torch.full((S, S), float("-inf")).triu(1)
    mask[S - 1, 3] = float("-inf")

    def block(mod, a, k):
        return a, {**k, "attention_mask": mask[None, None]}
    ref = hf_forward(m, ids, hooks=[(attn(m, l), "pre", block) for l in range(spec.n_layers)]).logits
    assert rel(got[:, -1], ref[:, -1]) < 1e-5 and rel(got[:, -1], m.run(ids).logits[:, -1]) > 1e-4

    # KVPatch: the cached slot 3 (every layer, every head, K and V) from the clean prefix.
    n = 12
    corrupt, source = m.run(ids[:, :n]), m.run(clean_ids[:, :n])
    got = m.run(ids[:, n:], past=corrupt.kv, interventions=[nk.KVPatch(source.kv, at=nk.Pos(3))]).logits
    hf_c, hf_s = hf_forward(m, ids[:, :n]).past_key_values, hf_forward(m, clean_ids[:, :n]).past_key_values
    for lc, ls in zip(hf_c.layers, hf_s.layers):  # MLA: the slot's latent and rotary key
        lc.keys[:, :, 3], lc.values[:, :, 3] = ls.keys[:, :, 3], ls.values[:, :, 3]
    ref = hf_forward(m, ids[:, n:], past_key_values=hf_c).logits
    unpatched = m.run(ids[:, n:], past=corrupt.kv).logits
    assert rel(got, ref) < 1e-5 and rel(got, unpatched) > 1e-4


# ---------------------------------------------------------------------------- positions
@pytest.mark.parametrize("arch", ARCHS)
def test_shift_invariance_at_a_random_offset(arch):
    m = model(arch)
    d = RNG.randint(1, MAX_SHIFT)
    base = KVCache.prefill(m, TEXT)
    shifted = KVCache.prefill(m, TEXT, offset=d)
    back = shifted.reposition(-d)
    assert torch.equal(back.positions, base.positions)
    for l in range(m.spec.n_layers):
        assert rel(back.keys[l], base.keys[l]) <= 1e-5, (arch, l, d, SEED)
    assert rel(shifted.keys, base.keys) > 0.1, (d, SEED)  # the test can fail: unmoved keys differ
    r = m.spec.rope[0]
    if arch in MLA:  # only the rotary part (the last qk_rope dims) turns
        assert r.rotary_offset + r.rotary_dim == m.spec.head_dim and r.rotary_offset > 0
        assert torch.equal(back.keys[..., : r.rotary_offset], shifted.keys[..., : r.rotary_offset])
        assert rel(back.keys[..., r.rotary_offset:], shifted.keys[..., r.rotary_offset:]) > 0.1


def test_rope_pairing_follows_each_models_rotary():
    """V2 multiplies complex numbers over (2i, 2i+1); V3 writes its rotated pairs half-split."""
    assert model("deepseek_v2").spec.rope[0].pairing == "interleaved"
    assert model("deepseek_v3").spec.rope[0].pairing == "half"
    assert model("deepseek_v3").hf.config.rope_interleave


def test_offset_rotation_fused_kernel_matches_reference():
    """The Triton kernel (interpreted on CPU) rotates only dims offset .. offset + R."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from notekv.kv.fused import rotate_keys
        g = torch.Generator().manual_seed(0)
        for pairing in ("half", "interleaved"):
            for d, r, off in ((16, 8, 8), (20, 8, 4), (24, 8, 8)):
                src = torch.randn(2, 1, 3, 10, d, generator=g)
                inv = torch.rand(2, r // 2, generator=g).double()
                delta = torch.randint(-500, 500, (6,), generator=g)
                si, di = torch.tensor([0, 2, 3, 5, 7, 9]), torch.tensor([1, 2, 4, 5, 6, 8])
                out = [rotate_keys(src, delta, inv, rotary_dim=r, pairing=pairing, dst=torch.zeros(2, 1, 3, 10, d),
                                   src_index=si, dst_index=di, backend=b, offset=off) for b in ("torch", "triton")]
                assert float((out[0] - out[1]).abs().max()) < 1e-5, (pairing, d, r, off)
                assert torch.equal(out[1][:, :, :, di, :off], src[:, :, :, si, :off])
                assert torch.equal(out[1][:, :, :, di, off + r:], src[:, :, :, si, off + r:])
                assert not torch.equal(out[1][:, :, :, di, off:off + r], src[:, :, :, si, off:off + r])
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _hf_cache_at(m, ids, position_ids) -> DynamicCache:
    return hf_forward(m, ids, position_ids=position_ids, past_key_values=DynamicCache()).past_key_values


def test_mrope_positions_move_all_three_components():
    """notekv's positions reach the model as [3, B, S] with equal components, moved together."""
    m = model("qwen2_5_vl")
    ids = m.to_tokens(TEXT)
    S, d = ids.shape[1], RNG.randint(1, MAX_SHIFT)
    three = (torch.arange(S) + d).view(1, 1, S).expand(3, 1, S)
    ref = hf_forward(m, ids, position_ids=three)
    run = m.run(ids, positions=d)
    assert torch.equal(run.logits, ref.logits), (d, SEED)
    hk, _ = hf_kv(m, ref.past_key_values)
    assert all(torch.equal(KVCache.prefill(m, ids, offset=d).keys[l], hk[l]) for l in range(m.spec.n_layers))
    # A continuation after a cache runs at the next three-component positions (after offset d,
    # or after 0), even when the model remembers rope_deltas from an earlier multimodal call.
    n = 10
    plain = hf_forward(m, ids)
    for offset, want in ((d, ref.logits), (0, plain.logits)):
        past = KVCache.prefill(m, ids[:, :n], offset=offset)
        m.hf.model.rope_deltas = torch.tensor([[5]])
        try:
            got = m.run(ids[:, n:], past=past).logits
        finally:
            m.hf.model.rope_deltas = None
        assert rel(got, want[:, n:]) < 1e-5, (offset, SEED)


def test_mrope_image_slots_keep_their_place_when_moved():
    """Slots whose three components differ (image placeholders) move by the usual rotation:
    shifting every component by d turns every frequency band by d."""
    m = model("qwen2_5_vl")
    ids = m.to_tokens(TEXT)
    S, d = ids.shape[1], RNG.randint(1, MAX_SHIFT)
    pos = torch.arange(S).view(1, 1, S).repeat(3, 1, 1)
    pos[:, 0, 5:9] = torch.tensor([[5, 5, 5, 5], [5, 5, 6, 6], [5, 6, 5, 6]])  # a 2x2 grid: t, h, w
    pos[:, 0, 9:] = torch.arange(S - 9) + 7  # text after it continues after the grid's largest component
    cache = KVCache.from_hf(_hf_cache_at(m, ids, pos), m, ids[0])
    assert torch.equal(cache.positions, torch.arange(S))  # one position per slot: its place in the sequence
    moved = cache.reposition(d)
    ref, _ = hf_kv(m, _hf_cache_at(m, ids, pos + d))
    for l in range(m.spec.n_layers):
        assert rel(moved.keys[l], ref[l]) <= 1e-5, (l, d, SEED)
    text_only, _ = hf_kv(m, _hf_cache_at(m, ids, torch.arange(S).view(1, 1, S).expand(3, 1, S) + d))
    assert rel(moved.keys[0][:, :, 5:9], text_only[0][:, :, 5:9]) > 1e-3  # the grid's offsets stayed in the keys


# ---------------------------------------------------------------------------- splice / compose
@pytest.mark.parametrize("arch", ARCHS)
def test_splice_and_compose(arch):
    m = model(arch)
    head, chunk, tail = "order_status: shipped.", " Refund request: granted?", " Let us see."
    full = KVCache.prefill(m, head + chunk + tail)
    n_head = len(m.tokenize(head).ids)
    n_chunk = len(m.tokenize(head + chunk).ids) - n_head
    d = RNG.randint(1, MAX_SHIFT)
    # Seam-free: the chunk saw the same context, at positions shifted by d.
    moved_chunk = KVCache.prefill(m, head + chunk, offset=d).select(range(n_head, n_head + n_chunk))
    out = nk.splice(m, [KVCache.prefill(m, head), moved_chunk, tail])
    assert torch.equal(out.positions, full.positions) and torch.equal(out.token_ids, full.token_ids)
    assert rel(out.keys, full.keys) <= 1e-5 and rel(out.values, full.values) <= 1e-5, (d, SEED)
    assert out.values.shape[-1] == m.spec.v_dim
    # The general case: an isolated chunk runs, within the model's noise of a recompute.
    iso = nk.splice(m, [KVCache.prefill(m, head), KVCache.prefill(m, chunk), tail])
    assert iso.keys.shape == full.keys.shape[:3] + (len(iso), m.spec.head_dim) and torch.isfinite(iso.keys).all()
    # compose: a skill after a prefix, continued with a suffix.
    skill = nk.Skill.compile(m, chunk, mode="prefix", prefix=head)
    comp = nk.compose(m, head, [skill], tail)
    ref = m.run(m.tokenize(tail, special=False).ids, past=KVCache.prefill(m, head + chunk)).logits
    assert rel(comp.logits, ref) <= 1e-5, (arch, SEED)


@pytest.mark.parametrize("arch", MLA)
def test_routed_layers_expose_expert_sites(arch):
    """Layer 0 is dense (first_k_dense_replace), 1-2 routed: moe.* exist there, the experts'
    contributions add up to the experts module's output, and re-routing with the router's own
    logits by the family's rule reproduces the model's routing exactly."""
    m = model(arch)
    assert m.spec.moe_layers == (1, 2) and m.spec.n_experts == 4
    ids = m.to_tokens(TEXT)
    with pytest.raises(SiteError, match="dense"):
        m.run(ids, collect=["L0.moe.router"])
    run = m.run(ids, collect=["L1.moe.router", "L1.moe.experts"])
    got = {}
    hook = (sub(m, f"{m.spec.layout.layers}.1.{m.spec.layout.experts}"), "out", lambda mod, a, o: got.__setitem__("e", o))
    base = hf_forward(m, ids, hooks=[hook]).logits
    assert torch.equal(run["L1.moe.experts"].sum(-2), got["e"].view(1, ids.shape[1], -1))
    assert torch.equal(m.run(ids, interventions=[nk.Patch("L1.moe.router", run)]).logits, base)
    noise = torch.randn(run["L1.moe.router"].shape, generator=torch.Generator().manual_seed(SEED))
    assert rel(m.run(ids, interventions=[nk.Patch("L1.moe.router", noise)]).logits, base) > 1e-3


# ---------------------------------------------------------------------------- runner / attribution
@pytest.mark.parametrize("arch", ARCHS)
def test_run_variants_and_kv_attribution(arch):
    m = model(arch)
    ids = m.to_tokens(TEXT)
    n = 12
    base = KVCache.prefill(m, ids[:, :n])
    src = KVCache.prefill(m, torch.cat([ids[:, :2], (ids[:, 2:n] + 1) % 256], 1))
    cells = [(None, 3, None), (1, 5, None), (0, 4, 1)]
    metric = logit_diff(10, 20)
    got = run_variants(m, ids[0, n:], KVMix.of_cells(src, cells), metric, past=base, method="hooks")
    for row, (layer, slot, head) in enumerate(cells):
        iv = nk.KVPatch(src, at=nk.Pos(slot), layers="all" if layer is None else [layer],
                        heads=None if head is None else (head,))
        one = m.run(ids[:, n:], past=base, interventions=[iv], logits="last").logits[:, -1].float()
        assert abs(float(metric(one)[0]) - float(got[row])) < 1e-4, (arch, row)
    assert len(set(got.tolist())) == len(cells)  # the rows differ: each patch changed something
    att = nk.attribute_kv(m, base, src, int(ids[0, n]), 10, 20)
    assert att.kv.shape == (1, m.spec.n_layers, m.spec.n_kv_heads, n) and torch.isfinite(att.kv).all()
    assert att.heads.shape == (1, m.spec.n_layers, m.spec.n_heads) and float(att.kv.abs().max()) > 0
    same = nk.attribute_kv(m, base, base, int(ids[0, n]), 10, 20)
    assert float(same.kv.abs().max()) == 0 and float(same.heads.abs().max()) < 1e-6  # heads: two kernels' z


# ---------------------------------------------------------------------------- backends
@pytest.mark.parametrize("arch", ARCHS)
def test_backends_run_or_refuse_naming_the_family(arch):
    m = model(arch)
    ids = m.to_tokens("order_status: shipped.")
    from notekv.backends.nnsight import NNsightBackend
    from notekv.backends.tl import TLBackend

    ref = m.run(ids, collect=["L1.resid_post", "L1.attn.z"])
    nn = NNsightBackend(m)
    got = nn.run(ids, collect=["L1.resid_post", "L1.attn.z"])
    assert torch.equal(got["L1.resid_post"], ref["L1.resid_post"]) and torch.equal(got["L1.attn.z"], ref["L1.attn.z"])
    if arch in MLA:
        with pytest.raises(UnsupportedError, match=arch):
            nn.run(ids, collect=["L1.attn.k"])
    if arch in MLA:  # the bridge's attention hooks carry the latent, not per-head activations
        with pytest.raises(UnsupportedError, match=arch):
            TLBackend(m)
        return
    try:  # Qwen2.5-VL: TransformerLens's adapter needs torchvision, an optional library
        tl = TLBackend(m)
    except UnsupportedError as err:
        assert arch in str(err)
        return
    assert rel(tl.run(ids, collect=["L1.resid_post"])["L1.resid_post"], ref["L1.resid_post"]) < 1e-5
