"""Attribution patching: gradient taps through the plan, KV attribution with the key fix,
activation attribution with GradDrop, and the agreement measures, checked against exact
patching on tiny models and on SmolLM2."""

from dataclasses import replace

import pytest
import torch

import notekv as nk
from notekv.attribution import agreement, attribute_acts, attribute_kv, exact_kv, spearman, stack_rows, summarize
from notekv.hooks.grad import GradError
from notekv.kv import KVCache

from conftest import count_hooks, prefix_caches, random_pair, tiny_model

GOOD, BAD = 40, 41


def _toward(old: KVCache, new: KVCache, eps: float) -> KVCache:
    """The cache a fraction ``eps`` of the way from ``old`` to ``new`` (every cell)."""
    return replace(new, keys=old.keys + eps * (new.keys - old.keys), values=old.values + eps * (new.values - old.values),
                   origin_keys=None, origin_positions=None)


# ---------------------------------------------------------------------- taps
def test_tap_gradient_equals_finite_difference():
    m = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    run = m.run(ids, interventions=[nk.Tap("L1.resid_pre"), nk.Tap("L0.attn.z")], logits="last", grad=True)
    g = run.grads(run.logits[0, -1, 3] - run.logits[0, -1, 4])
    assert g["L0.attn.z"].shape == run["L0.attn.z"].shape == (1, 4, 6, 16)
    x = run["L1.resid_pre"]
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    base = m.run(ids, logits="last").logits[0, -1]
    moved = m.run(ids, interventions=[nk.Patch("L1.resid_pre", x + d)], logits="last").logits[0, -1]
    fd = float((moved[3] - moved[4]) - (base[3] - base[4]))
    assert fd == pytest.approx(float((g["L1.resid_pre"] * d).sum()), rel=2e-2)


def test_tap_misuse_is_refused():
    m = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(GradError, match="grad=True"):
        m.run(ids, interventions=[nk.Tap("L0.resid_post")])
    with pytest.raises(nk.InputError, match="Tap"):
        m.run(ids, grad=True)
    with pytest.raises(nk.InputError, match="grad="):
        m.run(ids, interventions=[nk.Tap("L0.resid_post")], grad="yes")
    with pytest.raises(GradError, match="whole site"):
        nk.Tap("L0.attn.z.h1")
    run = m.run(ids, interventions=[nk.Tap("L0.resid_post")], grad=True)
    with pytest.raises(GradError, match="scalar"):
        run.grads(run.logits[0, -1, :2])
    run.grads(run.logits[0, -1, 3])
    with pytest.raises(GradError, match="used up"):
        run.grads(run.logits[0, -1, 3])


def test_gradients_leave_nothing_behind():
    m = tiny_model("llama")
    old, new = random_pair()
    co, cn = prefix_caches(m, old, new)
    before = count_hooks(m.hf)
    attribute_kv(m, co, cn, old[-1], GOOD, BAD)
    attribute_acts(m, old, new, answers=(GOOD, BAD), sites=("resid_pre", "attn.z"), graddrop=True)
    assert count_hooks(m.hf) == before
    assert not any(p.requires_grad or p.grad is not None for p in m.hf.parameters())
    for c in (co, cn):
        assert not c.keys.requires_grad and c.keys.grad_fn is None and not c.values.requires_grad
    assert torch.is_grad_enabled()
    with torch.no_grad():  # the caller's grad mode is restored too
        attribute_kv(m, co, cn, old[-1], GOOD, BAD)
        assert not torch.is_grad_enabled()
    run = m.run(torch.tensor([old]), logits="last")  # a plain forward afterwards builds no graph
    assert run.logits.grad_fn is None and not run.taps


# ---------------------------------------------------------------------- KV attribution
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "gpt_neox"])
def test_kv_attribution_is_exact_in_the_linear_regime(arch):
    """A small patch (1% of the way to NEW) is linear: each estimate equals the exact change
    (float64, so that the exact change stands clear of rounding)."""
    m = nk.tiny(arch, dtype=torch.float64)
    old, new = random_pair(edit=(8, 9))
    co, cn = prefix_caches(m, old, new)
    near = _toward(co, cn, 1e-2)
    att = attribute_kv(m, co, near, old[-1], GOOD, BAD)
    cells = [(l, p, h) for l in range(m.spec.n_layers) for p in (8, 9, 12, 18) for h in range(m.spec.n_kv_heads)]
    for which, parts in (("kv", ("kv", "kv_plain")), ("k", ("k", "k_fixed")), ("v", ("v",))):
        ex = exact_kv(m, co, near, old[-1], GOOD, BAD, cells, which=which)
        scale = float(ex.abs().max())
        assert scale > 1e-7
        for part in parts:
            est = torch.stack([att.part(part)[0, l, h, p] for l, p, h in cells])
            assert float((est - ex).abs().max()) < 0.03 * scale, (arch, part)
    pos = exact_kv(m, co, near, old[-1], GOOD, BAD, [(None, 8), (None, 12)])
    assert att.positions()[0, [8, 12]] == pytest.approx(pos.tolist(), rel=0.03, abs=0.03 * float(pos.abs().max()))


def test_key_fix_matters_where_attention_saturates():
    """The decision query attends almost only to one key; patching that key moves the
    decision a lot, while the softmax's gradient there is ~0. AtP misses it, AtP* does not."""
    m = tiny_model("llama")
    old, _ = random_pair()
    co, _ = prefix_caches(m, old, old)
    l, p, h = m.spec.n_layers - 1, 10, 0
    run = m.run(torch.tensor([[old[-1]]]), past=co, collect=[f"L{l}.attn.q"], logits="last")
    q = run[f"L{l}.attn.q"][0, m.spec.q_heads_of(h), -1]  # [group, D]
    direction = (q / q.norm(dim=-1, keepdim=True)).sum(0)
    keys = co.keys.clone()
    keys[l, 0, h, p] = direction * (40.0 / float((q @ direction).min()) / m.spec.head_dim ** -0.5)
    saturated = replace(co, keys=keys, origin_keys=None, origin_positions=None)
    pattern = m.run(torch.tensor([[old[-1]]]), past=saturated, collect=[f"L{l}.attn.pattern"], logits="last")
    assert float(pattern[f"L{l}.attn.pattern"][0, m.spec.q_heads_of(h), -1, p].min()) > 0.99
    att = attribute_kv(m, saturated, co, old[-1], GOOD, BAD)
    exact = float(exact_kv(m, saturated, co, old[-1], GOOD, BAD, [(l, p, h)], which="k")[0])
    fixed, plain = float(att.k_fixed[0, l, h, p]), float(att.k[0, l, h, p])
    assert abs(exact) > 1e-2
    assert abs(fixed - exact) < 0.2 * abs(exact)
    assert abs(plain) < 0.2 * abs(exact)


def test_batched_pairs_equal_single_pairs():
    m = tiny_model("gemma3_text")
    pairs = [random_pair(seed=s) for s in (0, 1, 2)]
    caches = [prefix_caches(m, o, n) for o, n in pairs]
    batched = attribute_kv(m, stack_rows([c[0] for c in caches]), stack_rows([c[1] for c in caches]),
                           [o[-1] for o, _ in pairs], GOOD, BAD)
    for b, ((o, _), (co, cn)) in enumerate(zip(pairs, caches)):
        single = attribute_kv(m, co, cn, o[-1], GOOD, BAD)
        for part in ("kv", "k", "v", "k_fixed"):
            torch.testing.assert_close(batched.row(b).part(part), single.part(part), atol=1e-5, rtol=1e-4)
        assert float(batched.s_old[b]) == pytest.approx(float(single.s_old[0]), abs=1e-5)


def test_kv_attribution_refuses_mismatched_input():
    m = tiny_model("llama")
    old, new = random_pair()
    co, cn = prefix_caches(m, old, new)
    with pytest.raises(nk.InputError, match="same prompt length"):
        attribute_kv(m, co, cn.select(range(len(cn) - 1)), old[-1], GOOD, BAD)
    with pytest.raises(nk.InputError, match="token ids for 1 batch rows"):
        attribute_kv(m, co, cn, [old[-1], old[-1]], GOOD, BAD)
    with pytest.raises(nk.CacheMismatchError):
        attribute_kv(tiny_model("qwen3"), co, cn, old[-1], GOOD, BAD)
    with pytest.raises(nk.InputError, match="part="):
        nk.kv_attribution(m, old, new, answers=(GOOD, BAD), part="q")
    with pytest.raises(nk.InputError, match="aligned"):
        nk.kv_attribution(m, old, new[:-1], answers=(GOOD, BAD))
    with pytest.raises(nk.InputError, match="slot"):
        exact_kv(m, co, cn, old[-1], GOOD, BAD, [(0, len(co))])


def test_kv_attribution_sweep_verifies_itself():
    m = tiny_model("llama")
    old, new = random_pair(edit=(8, 9))
    sw = nk.kv_attribution(m, old, new, answers=(GOOD, BAD), verify=10)
    v = sw.meta["verify"]
    assert sw.values.shape == (m.spec.n_layers, len(old) - 1) and sw.meta["method"] == "attribution"
    assert len(v["cells"]) == len(v["exact"]) == 20 and v["n_top"] == 10
    assert all(c[1] >= 8 for c in v["cells"])  # only live cells (after the first difference)
    assert v["spearman"] > 0.9 and v["top8_overlap"] >= 0.75
    assert torch.all(sw.values[:, :8] == sw.m_old)  # cells before the edit cannot move the decision


# ---------------------------------------------------------------------- activation attribution
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "attn.z", "attn.v"])
def test_activation_attribution_matches_small_patches(site):
    m = tiny_model("llama")
    old, new = random_pair(edit=(8,))
    att = attribute_acts(m, old, new, answers=(GOOD, BAD), sites=(site,))
    l, p = 1, 12
    names = [f"L{l}.{site}"]
    ro = m.run(torch.tensor([old]), collect=names, logits="last")
    rn = m.run(torch.tensor([new]), collect=names, logits="last")
    eps = 1e-2
    x = ro[names[0]].clone()
    if x.dim() == 3:
        x[0, p] += eps * (rn[names[0]][0, p] - x[0, p])
        est = float(att.estimate(site)[l, p])
    else:
        x[0, 0, p] += eps * (rn[names[0]][0, 0, p] - x[0, 0, p])
        est = float(att.estimate(site)[l, 0, p])
    moved = m.run(torch.tensor([old]), interventions=[nk.Patch(names[0], x, at=nk.Pos(p))], logits="last").logits
    fd = (float(moved[0, -1, GOOD] - moved[0, -1, BAD]) - att.m_old) / eps
    assert abs(est) > 1e-4
    assert fd == pytest.approx(est, rel=0.03)


def test_graddrop_only_changes_what_flows_through_a_dropped_layer():
    m = tiny_model("llama")
    L = m.spec.n_layers
    old, new = random_pair(edit=(8,))
    att = attribute_acts(m, old, new, answers=(GOOD, BAD), sites=("resid_post", "resid_pre"), graddrop=True)
    last = att.estimate("resid_post")[L - 1]  # reads the logits directly: no layer above it to drop
    torch.testing.assert_close(last, att.estimate("resid_post", plain=True)[L - 1].abs() * L / (L - 1))
    first = att.estimate("resid_pre")[0, 8:]
    assert not torch.allclose(first, att.estimate("resid_pre", plain=True)[0, 8:].abs() * L / (L - 1), rtol=1e-3)
    assert att.sweep("resid_pre").meta["method"] == "graddrop"
    assert att.sweep("resid_pre", plain=True).meta["method"] == "attribution"
    with pytest.raises(nk.InputError, match="head="):
        attribute_acts(m, old, new, answers=(GOOD, BAD), sites=("attn.z",)).sweep("attn.z")
    with pytest.raises(nk.InputError, match="sites="):
        attribute_acts(m, old, new, answers=(GOOD, BAD), sites=("attn.pattern",))


# ---------------------------------------------------------------------- agreement
def test_agreement_measures():
    x = torch.arange(40.0)
    assert spearman(x, x) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    a = agreement(x, x)
    assert a["top8_overlap"] == a["top32_overlap"] == a["recall8_at_32"] == 1.0
    shuffled = x.clone()
    shuffled[-8:] = 0.0  # the estimate misses the 8 largest cells, ranks the rest right
    b = agreement(shuffled, x)
    assert b["top8_overlap"] == 0.0 and b["recall8_at_32"] == 0.0
    c = agreement(torch.tensor([3.0, -9.0, 1.0]), torch.tensor([2.0, -8.0, 0.5]), ks=(1,))
    assert c["top1_overlap"] == 1.0  # by magnitude: the large negative cell
    s = summarize([a, b])
    assert s["top8_overlap"]["n"] == 2 and s["top8_overlap"]["mean"] == 0.5


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_kv_attribution_linear_regime_and_ranking():
    """A step 1% of the way from OLD's cache to NEW's: the estimate is the exact patch to first
    order. In float64, since in fp32 the two forwards' rounding (about 1.5e-5 logits on this
    model, whatever the step) is 3% of the exact effect of so small a step."""
    from circuits import scenarios
    from circuits.pairstate import prefill_pair

    model = nk.load("smollm2-135m", dtype=torch.float64)
    p = scenarios.get("refund").pairs(model, 1, seed=0)[0]
    st = prefill_pair(model, p)
    near = _toward(st.old, st.new, 1e-2)
    att = attribute_kv(model, st.old, near, p.old_ids[-1], p.good, p.bad)
    span = list(p.span_slots)
    cells = [(l, q) for l in (0, 10, 20, 29) for q in span + [st.n_ctx - 1]]
    ex = exact_kv(model, st.old, near, p.old_ids[-1], p.good, p.bad, cells)
    est = torch.tensor([float(att.cells()[0, l, q]) for l, q in cells])
    assert float((est - ex).abs().max()) < 0.03 * float(ex.abs().max())


def test_report_ranking_is_checked_at_the_boundary():
    from circuits import attribution as cattr
    from circuits.report import CircuitReport

    m = tiny_model("llama")
    with pytest.raises(nk.InputError, match="ranking="):
        CircuitReport.build(m, "refund", pairs=2, ranking="gradient", progress=False)
    with pytest.raises(nk.InputError, match="attribution_pairs"):
        CircuitReport.build(m, "refund", pairs=2, attribution_pairs=0, progress=False)
    with pytest.raises(nk.InputError, match="ranking="):
        cattr.choose("fast", [])
