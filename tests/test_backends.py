"""Parity of the optional backends (TransformerLens bridge, nnsight) with the native hook layer.

Every test runs the same site strings and intervention objects through ``model.run`` and a
backend and compares real numbers (fp32, 1e-5). Models run with eager attention on both
sides (each test model is the tests' own copy): the bridge always computes eager attention,
and eager vs SDPA alone differs by 3e-5 to 5e-5 in SmolLM2's logits. With eager on both
sides every comparison here is in fact bit-identical.
"""

from __future__ import annotations

import pytest
import torch

import notekv as nk
from notekv import Ablate, Hook, Knockout, KVPatch, Patch, Steer
from notekv.hooks.positions import Last, Pos
from tests.conftest import count_hooks

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")

from notekv.backends import support_table  # noqa: E402
from notekv.backends.nnsight import NNsightBackend  # noqa: E402
from notekv.backends.tl import TLBackend  # noqa: E402

TOL = 1e-5
TINY = ("llama", "qwen3", "gemma3_text")
BACKENDS = {"tl": TLBackend, "nnsight": NNsightBackend}
# (a): the sites the brief lists; attn.pattern only where the backend has it.
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn.k", "attn.v", "attn.z", "attn.pattern")
EXTRA_SITES = ("resid_mid", "attn.q", "attn.q_pre", "attn.k_pre", "attn.scores")
NO_PATTERN = {"nnsight": ("attn.pattern", "attn.scores")}

# Equal length in tokens for the byte tokenizer (equal characters) and for SmolLM2's BPE.
TINY_CLEAN, TINY_CORRUPT = "order_status: shipped\nanswer:", "order_status: pending\nanswer:"
REAL_CLEAN = "Question: what is the capital of France? Answer: the capital city is"  # 15 tokens
REAL_CORRUPT = "Question: what is the capital of Italy? Answer: the capital city is"


def _eager(model):
    model.hf.config._attn_implementation = "eager"
    return model


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


_cache: dict = {}


def _tiny(arch: str):
    if ("model", arch) not in _cache:
        _cache[("model", arch)] = _eager(nk.tiny(arch))
    return _cache[("model", arch)]


def _backend(kind: str, model):
    key = (kind, id(model))
    if key not in _cache:
        _cache[key] = BACKENDS[kind](model)
    return _cache[key]


@pytest.fixture(scope="session")
def smol():
    try:
        model = nk.load("smollm2-135m")
    except Exception as err:  # noqa: BLE001 - the bundled model package may be absent
        pytest.skip(f"smollm2-135m not available: {err}")
    return _eager(model)


def _sites_for(kind: str, layer: int, names) -> list[str]:
    return [f"L{layer}.{n}" for n in names if n not in NO_PATTERN.get(kind, ())]


# ---------------------------------------------------------------- (a) collected activations
def _check_collect(model, backend, prompt: str, sites: list[str]) -> float:
    native = model.run(prompt, collect=sites)
    other = backend.run(prompt, collect=sites)
    worst = _maxdiff(native.logits, other.logits)
    assert worst <= TOL, f"logits differ by {worst}"
    for s in sites:
        a, b = native.acts[s], other.acts[s]
        assert a.abs().max() > 0, f"{s} is all zeros natively: the comparison would prove nothing"
        d = _maxdiff(a, b)
        assert d <= TOL, f"{type(backend).__name__} {s}: max abs diff {d}"
        worst = max(worst, d)
    return worst


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("kind", BACKENDS)
def test_collect_parity_tiny(kind, arch):
    model = _tiny(arch)
    heads = [f"L0.attn.v.h{model.spec.n_kv_heads - 1}", "L1.attn.z.h2"]
    sites = ["embed", "logits"] + _sites_for(kind, 1, SITES + EXTRA_SITES) + heads
    _check_collect(model, _backend(kind, model), TINY_CLEAN, sites)


def test_collect_parity_batch_ids_and_cache():
    model = _tiny("llama")
    for kind in BACKENDS:
        _check_collect(model, _backend(kind, model), [TINY_CLEAN, TINY_CORRUPT], ["L1.resid_pre", "L2.attn.k"])
    ids = list(model.tokenize(TINY_CLEAN).ids)  # ids instead of text: same numbers
    native = model.run(ids, collect=["L2.attn.v"])
    for kind in BACKENDS:
        other = _backend(kind, model).run(torch.tensor([ids]), collect=["L2.attn.v"])
        assert _maxdiff(native["L2.attn.v"], other["L2.attn.v"]) <= TOL
    nn_run = _backend("nnsight", model).run(TINY_CLEAN)  # nnsight also returns the forward's cache
    a, b = model.run(TINY_CLEAN).kv, nn_run.kv
    assert _maxdiff(a.keys, b.keys) <= TOL and _maxdiff(a.values, b.values) <= TOL


# ---------------------------------------------------------------- (b) patching
def _check_patch(model, backend, clean: str, corrupt: str, site: str, pos: int) -> float:
    assert len(model.tokenize(clean)) == len(model.tokenize(corrupt))
    s = nk.site(site)
    clean_native = model.run(clean, collect=[str(s.whole)])
    clean_other = backend.run(clean, collect=[str(s.whole)])
    base = model.run(corrupt)
    patched = model.run(corrupt, interventions=[Patch(site, source=clean_native, at=pos)])
    effect = _maxdiff(patched.logits, base.logits)
    assert effect > 1e-3, f"patching {site} at {pos} changed nothing ({effect}); pick another position"
    worst = 0.0
    for source in (clean_native, clean_other):  # a Run from either backend is a valid source
        other = backend.run(corrupt, interventions=[Patch(site, source=source, at=pos)])
        worst = max(worst, _maxdiff(patched.logits, other.logits))
    assert worst <= TOL, f"{type(backend).__name__} patch {site}@{pos}: logits differ by {worst}"
    return worst


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
@pytest.mark.parametrize("kind", BACKENDS)
def test_patch_parity_tiny(kind, arch):
    model = _tiny(arch)
    backend = _backend(kind, model)
    pos = TINY_CLEAN.index("shipped") + 1  # the first differing byte (+1 for BOS)
    _check_patch(model, backend, TINY_CLEAN, TINY_CORRUPT, "L1.resid_pre", pos)
    _check_patch(model, backend, TINY_CLEAN, TINY_CORRUPT, "L0.attn.v.h1", pos)
    _check_patch(model, backend, TINY_CLEAN, TINY_CORRUPT, "L1.attn.z", pos)


def test_patch_tensor_source():
    model = _tiny("llama")
    vec = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1))
    iv = [Patch("L1.resid_post", source=vec, at=[4])]
    native = model.run(TINY_CORRUPT, interventions=iv)
    assert _maxdiff(native.logits, model.run(TINY_CORRUPT).logits) > 1e-3
    for kind in BACKENDS:
        assert _maxdiff(native.logits, _backend(kind, model).run(TINY_CORRUPT, interventions=iv).logits) <= TOL


# ---------------------------------------------------------------- (c) steer / ablate / hook
def _intervention_cases(model, kind: str, layer: int):
    g = torch.Generator().manual_seed(0)
    spec = model.spec
    d, hd = spec.d_model, spec.head_dim
    cases = [
        Ablate(f"L{layer}.resid_pre", at=[2, 3]),
        Ablate(f"L{layer}.attn_out"),
        Ablate(f"L{layer}.mlp_out", at=Last()),
        Ablate(f"L{layer}.attn.z.h1", at=[3]),
        Ablate(f"L{layer}.attn.v", at=[1, 2]),
        Ablate(f"L{layer}.attn.k"),
        Ablate(f"L{layer}.resid_post", kind="mean"),
        Steer(f"L{layer}.resid_pre", vector=torch.randn(d, generator=g), scale=2.0),
        Steer(f"L{layer}.resid_post", vector=torch.randn(d, generator=g), at=Last()),
        Steer(f"L{layer}.attn.v", vector=torch.randn(spec.n_kv_heads, hd, generator=g), at=[2]),
        Steer(f"L{layer}.attn.q_pre.h0", vector=torch.randn(hd, generator=g)),
    ]
    if kind == "tl":
        cases.append(Ablate(f"L{layer}.attn.pattern", at=[3]))
    return cases


def _check_interventions(model, backend, prompt: str, cases) -> float:
    base = model.run(prompt)
    worst = 0.0
    for iv in cases:
        a = model.run(prompt, interventions=[iv])
        assert _maxdiff(a.logits, base.logits) > 1e-4, f"{iv} has no effect natively"
        b = backend.run(prompt, interventions=[iv])
        d = _maxdiff(a.logits, b.logits)
        assert d <= TOL, f"{type(backend).__name__} {type(iv).__name__} at {iv.site}: logits differ by {d}"
        worst = max(worst, d)
    both = cases[:3]  # several interventions in one forward, across sites in execution order
    worst = max(worst, _maxdiff(model.run(prompt, interventions=both).logits,
                                backend.run(prompt, interventions=both).logits))
    assert worst <= TOL
    return worst


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("kind", BACKENDS)
def test_steer_ablate_parity_tiny(kind, arch):
    model = _tiny(arch)
    _check_interventions(model, _backend(kind, model), TINY_CLEAN, _intervention_cases(model, kind, 1))


@pytest.mark.parametrize("kind", BACKENDS)
def test_hook_and_resample_parity(kind):
    model = _tiny("llama")
    backend = _backend(kind, model)
    ref = model.run([TINY_CORRUPT, TINY_CORRUPT.replace("pending", "delayed")], collect=["L1.mlp_out"])

    def in_place(t, *, hook):
        t[:, hook.local([3, 4])] *= 0.5  # edit in place, return None

    def replace(t, *, hook):
        return t.flip(-1)

    for ivs in ([Hook("L1.resid_mid", in_place)], [Hook("L0.attn.k.h1", replace)],
                [Ablate("L1.mlp_out", kind="resample", reference=ref, at=[16, 17], seed=3)],
                [Ablate("L1.mlp_out", kind="mean", reference=ref)]):
        a = model.run(TINY_CLEAN, interventions=ivs, collect=["L2.resid_pre"])
        b = backend.run(TINY_CLEAN, interventions=ivs, collect=["L2.resid_pre"])
        assert _maxdiff(a.logits, model.run(TINY_CLEAN).logits) > 1e-4
        assert _maxdiff(a.logits, b.logits) <= TOL
        assert _maxdiff(a["L2.resid_pre"], b["L2.resid_pre"]) <= TOL


# ---------------------------------------------------------------- (d) unsupported
@pytest.mark.parametrize("kind", BACKENDS)
def test_unsupported_raises(kind):
    model = _tiny("llama")
    backend = _backend(kind, model)
    name = {"tl": "TransformerLens", "nnsight": "nnsight"}[kind]
    bad_sites = ["L1.kv.k", "L0.kv.v"] + (["L1.attn.pattern", "L1.attn.scores"] if kind == "nnsight" else [])
    for s in bad_sites:
        with pytest.raises(NotImplementedError, match=name) as err:
            backend.run(TINY_CLEAN, collect=[s])
        assert s in str(err.value)
        with pytest.raises(NotImplementedError, match=s.replace(".", r"\.")):
            backend.run(TINY_CLEAN, interventions=[Ablate(s)])
    for iv in (Knockout(src=Pos(0), dst=Last()), KVPatch(source=model.run(TINY_CLEAN))):
        with pytest.raises(NotImplementedError, match=type(iv).__name__):
            backend.run(TINY_CLEAN, interventions=[iv])
    with pytest.raises(nk.SiteError):  # a bad layer is the same SiteError as natively
        backend.run(TINY_CLEAN, collect=["L9.resid_pre"])
    from notekv.hooks.sitemap import UnsupportedError

    with pytest.raises(UnsupportedError):  # the notekv class, still a NotImplementedError
        backend.run(TINY_CLEAN, interventions=[Knockout(src=Pos(0), dst=Last())])


def test_unsupported_per_architecture():
    neox = _tiny("gpt_neox")
    with pytest.raises(NotImplementedError, match=r"L1\.attn\.k.*TransformerLens"):
        _backend("tl", neox).run("hello", collect=["L1.attn.k"])
    with pytest.raises(NotImplementedError, match=r"L0\.resid_mid.*parallel residual"):
        _backend("nnsight", neox).run("hello", collect=["L0.resid_mid"])
    # what GPT-NeoX does support still matches (fused QKV slices on nnsight)
    for kind in BACKENDS:
        _check_collect(neox, _backend(kind, neox), TINY_CLEAN, ["L1.attn.q_pre", "L1.attn.k_pre", "L1.attn.v",
                                                                "L1.attn.z", "L1.resid_post"])


# ---------------------------------------------------------------- the native model is untouched
def test_native_model_untouched():
    model = nk.tiny("llama")
    before = model.run(TINY_CLEAN).logits
    impl, n_mods = model.hf.config._attn_implementation, len(list(model.hf.modules()))
    tl, nn_ = TLBackend(model), NNsightBackend(model)
    tl.run(TINY_CLEAN, interventions=[Ablate("L0.resid_post")])
    nn_.run(TINY_CLEAN, interventions=[Ablate("L0.resid_post")])
    assert model.hf.config._attn_implementation == impl == "sdpa"
    assert len(list(model.hf.modules())) == n_mods and not hasattr(model.hf, "generator")
    assert "forward" not in vars(model.hf)  # nnsight's controller went on the clone only
    assert count_hooks(model.hf) == 0
    assert tl.hf.lm_head.weight is model.hf.lm_head.weight is nn_.hf.lm_head.weight  # shared, not copied
    assert _maxdiff(model.run(TINY_CLEAN).logits, before) == 0.0
    with torch.no_grad():  # a weight edit shows in every backend
        model.hf.lm_head.weight[0] += 1.0
    try:
        edited = model.run(TINY_CLEAN).logits
        assert _maxdiff(edited, before) > 0.1
        assert _maxdiff(edited, nn_.run(TINY_CLEAN).logits) <= TOL
        assert _maxdiff(edited, tl.run(TINY_CLEAN).logits) <= 1e-4  # SDPA (native) vs eager (bridge), |logit| ~ 12
    finally:
        with torch.no_grad():
            model.hf.lm_head.weight[0] -= 1.0


def test_support_table():
    table = support_table()
    assert table == nk.hooks.sitemap.format_support_table()  # one table, generated from the map
    head = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert head[:4] == ["site", "native", "TL", "nnsight"]
    rows = {line.split("|")[1].strip().split()[0].strip("`"): [c.strip() for c in line.split("|")[2:5]]
            for line in table.splitlines() if line.startswith("| `")}
    assert rows["resid_pre"] == ["✓", "✓", "✓"]
    assert rows["attn.pattern"][:2] == ["✓", "✓"] and "attention kernel" in rows["attn.pattern"][2]
    assert rows["kv.k"][0] == "✓" and all("cache slot" in c for c in rows["kv.k"][1:])
    assert rows["attn.mask"][0] == "✓" and all("knockout" in c for c in rows["attn.mask"][1:])
    assert rows["attn.k"][1].startswith("✓ except") and "gpt_neox" in rows["attn.k"][1]
    assert rows["resid_mid"][2].startswith("✓ except") and "parallel residual" in rows["resid_mid"][2]


def test_support_table_rows_follow_each_backend():
    """Every ✓ of a model's table is a site the backend runs; every refusal is an
    UnsupportedError naming the site and the backend."""
    from notekv.hooks.sitemap import UnsupportedError, support_table as rows_of

    for arch in ("qwen3", "gpt_neox"):
        model = _tiny(arch)
        for row in rows_of(model.spec):
            if row["site"] == "attn.mask":
                continue
            s = row["site"] if row["site"] in ("embed", "logits") else f"L1.{row['site']}"
            for kind in BACKENDS:
                backend = _backend(kind, model)
                if row[kind] == "✓":
                    assert s in backend.run(TINY_CLEAN, collect=[s]).acts
                else:
                    with pytest.raises(UnsupportedError, match=s.replace(".", r"\.")):
                        backend.run(TINY_CLEAN, collect=[s])


# ---------------------------------------------------------------- gradients
GRAD_SITES = ("L0.resid_pre", "L1.attn.z", "L1.attn.v", "L1.attn.k", "L1.mlp_out")


@pytest.mark.parametrize("arch", ("llama", "gemma3_text"))
@pytest.mark.parametrize("kind", BACKENDS)
def test_tap_gradients_match_the_native_executor(kind, arch):
    model = _tiny(arch)
    backend = _backend(kind, model)
    good, bad = 70, 71
    ivs = [nk.Tap(s) for s in GRAD_SITES]

    def grads(run):
        score = (run.logits[:, -1, good] - run.logits[:, -1, bad]).sum()
        return run.grads(score)

    native = grads(model.run([TINY_CLEAN, TINY_CORRUPT], interventions=ivs, grad=True))
    other_run = backend.run([TINY_CLEAN, TINY_CORRUPT], interventions=ivs, grad=True)
    assert set(other_run.acts) == set(GRAD_SITES)  # a Tap records its site like Collect
    other = grads(other_run)
    for s in GRAD_SITES:
        assert native[s].abs().max() > 0, f"{s}: zero gradient natively proves nothing"
        assert _maxdiff(native[s], other[s]) <= 1e-4, s
    assert not any(p.requires_grad for p in model.hf.parameters())  # weights stay frozen


@pytest.mark.parametrize("kind", BACKENDS)
def test_tap_and_grad_flag_must_agree(kind):
    model = _tiny("llama")
    backend = _backend(kind, model)
    with pytest.raises(nk.GradError, match="grad=True") as err:
        backend.run(TINY_CLEAN, interventions=[nk.Tap("L1.resid_pre")])
    assert type(backend).__name__ in str(err.value) and isinstance(err.value, nk.InputError)
    with pytest.raises(nk.GradError, match="Tap"):
        backend.run(TINY_CLEAN, grad=True)
    with pytest.raises(nk.InputError, match="grad='yes'"):
        backend.run(TINY_CLEAN, grad="yes")
    with pytest.raises(NotImplementedError, match="kv.k"):  # a tap where the backend cannot reach
        backend.run(TINY_CLEAN, interventions=[nk.Tap("L1.kv.k")], grad=True)


# ---------------------------------------------------------------- the real model
@pytest.fixture(scope="session")
def smol_backends(smol):
    return {kind: _backend(kind, smol) for kind in BACKENDS}


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_collect_parity_smollm2(smol, smol_backends, kind):
    sites = [s for l in (0, 14, 29) for s in _sites_for(kind, l, SITES)] + ["logits"]
    _check_collect(smol, smol_backends[kind], REAL_CLEAN, sites)


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_patch_parity_smollm2(smol, smol_backends, kind):
    pos = smol.to_str_tokens(REAL_CLEAN).index(" France")  # " Italy" in the corrupted prompt
    _check_patch(smol, smol_backends[kind], REAL_CLEAN, REAL_CORRUPT, "L8.resid_pre", pos)


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_steer_ablate_parity_smollm2(smol, smol_backends, kind):
    _check_interventions(smol, smol_backends[kind], REAL_CLEAN, _intervention_cases(smol, kind, 10)[:8])
