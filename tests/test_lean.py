"""The lean runtime against the HF path: same K/V, same logits (tiny models, SmolLM2 slow)."""

from __future__ import annotations

import pytest
import torch

import notekv as nk
from notekv.compose import Skill, compose, text_ids
from notekv.lean import LeanEngine, LeanUnsupportedError, lean_support

LEAN_ARCHS = ["llama", "llama3", "mistral", "qwen3", "gemma3_text", "gpt_neox"]
PREFIX = "System: answer from the policy.\n"
POLICY = "Refund policy: refunds within 30 days if unopened.\n"
SUFFIX = "Order placed 12 days ago. Refund? Answer:"

_models: dict = {}


def model_for(arch: str, dtype=torch.float32):
    key = (arch, dtype)
    if key not in _models:
        _models[key] = nk.tiny(arch, dtype=dtype)
    return _models[key]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n,), generator=g)


@pytest.mark.parametrize("arch", LEAN_ARCHS)
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_prefill_and_decode_match_hf_forward(arch, mode):
    model = model_for(arch)
    ids = _ids(40)
    eng = LeanEngine(model, 100, mode=mode)
    # Stale finite garbage past the filled slots must stay invisible (static mode reads it).
    eng.keys.fill_(1e4)
    eng.values.fill_(-1e4)
    first = eng.prefill(ids[:29])
    last = eng.prefill(ids[29:])
    step = eng.decode(7)
    full = torch.cat([ids, torch.tensor([7])])[None]
    ref = model.hf(full).logits[0]
    assert (first[0] - ref[28]).abs().max() <= 1e-5
    assert (last[0] - ref[39]).abs().max() <= 1e-5
    assert (step[0] - ref[40]).abs().max() <= 1e-5
    kv = model.run(full).kv
    for l in range(model.spec.n_layers):
        assert (eng.keys[l, :, :, :41] - kv.keys[l]).abs().max() <= 1e-5
        assert (eng.values[l, :, :, :41] - kv.values[l]).abs().max() <= 1e-5
    assert eng.length == 41 and eng.token_ids[:41].tolist() == full[0].tolist()


def test_sliding_window_is_enforced():
    # tiny gemma3 has window 8: 40 tokens exercise the window on its sliding layers.
    model = model_for("gemma3_text")
    assert model.spec.window_of(0) == 8
    ids = _ids(40, seed=1)
    eng = LeanEngine(model, 64)
    out = eng.prefill(ids, logits="all")
    ref = model.hf(ids[None]).logits
    assert (out - ref).abs().max() <= 1e-5


def test_long_prefill_in_chunks_equals_one_call():
    model = model_for("llama")
    ids = _ids(50, seed=2)
    whole = LeanEngine(model, 64)
    ref = whole.prefill(ids, logits="all")
    chunked = LeanEngine(model, 64)
    chunked.chunk = 16
    out = chunked.prefill(ids, logits="all")
    assert out.shape == ref.shape == (1, 50, model.spec.vocab_size)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.allclose(chunked.keys, whole.keys, atol=1e-6)


@pytest.mark.parametrize("arch", LEAN_ARCHS)
@pytest.mark.parametrize("seam", [0, 3])
def test_compose_lean_equals_hf_fp32(arch, seam):
    model = model_for(arch)
    skill = Skill.compile(model, POLICY, name="policy")
    hf = compose(model, PREFIX, [skill], SUFFIX, seam=seam, engine="hf")
    lean = compose(model, PREFIX, [skill], SUFFIX, seam=seam, engine="lean")
    assert (hf.engine, lean.engine) == ("hf", "lean")
    assert lean.spans == hf.spans
    assert lean.logits.shape == hf.logits.shape
    assert (lean.logits - hf.logits).abs().max() <= 1e-5
    a, b = hf.cache, lean.cache
    assert (a.keys - b.keys).abs().max() <= 1e-5 and (a.values - b.values).abs().max() <= 1e-5
    assert a.segments == b.segments and torch.equal(a.token_ids, b.token_ids)
    # the skill's cache is never modified by either path
    again = Skill.compile(model, POLICY, name="policy")
    assert torch.equal(skill.cache.keys, again.cache.keys)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_compose_lean_equals_hf_bf16(arch):
    model = model_for(arch, torch.bfloat16)
    skill = Skill.compile(model, POLICY, name="policy")
    hf = compose(model, PREFIX, [skill], SUFFIX, seam=2, engine="hf", logits="last")
    lean = compose(model, PREFIX, [skill], SUFFIX, seam=2, engine="lean", logits="last")
    assert lean.logits.shape == hf.logits.shape == (1, 1, model.spec.vocab_size)
    scale = hf.logits.float().abs().max()
    # bf16 has 8 mantissa bits: allow two units in the last place of the largest logit
    assert (lean.logits - hf.logits.float()).abs().max() <= 2 * 2.0 ** -7 * scale
    assert int(lean.logits.argmax()) == int(hf.logits.argmax())


def test_prefix_hit_equals_text_prefix():
    model = model_for("llama")
    skill = Skill.compile(model, POLICY, name="policy")
    head = nk.KVCache.prefill(model, PREFIX)
    by_text = compose(model, PREFIX, [skill], SUFFIX, engine="lean")
    by_cache = compose(model, head, [skill], SUFFIX, engine="lean")
    by_cache_hf = compose(model, head, [skill], SUFFIX, engine="hf")
    assert (by_text.logits - by_cache.logits).abs().max() <= 1e-5
    assert (by_cache_hf.logits - by_cache.logits).abs().max() <= 1e-5


def test_greedy_continuation_matches_generate():
    model = model_for("llama")
    prompt = "Refund policy: 30 days."
    ids = list(model.tokenize(prompt).ids)
    eng = model.lean(64)
    new = eng.greedy(eng.prefill(ids), 6)
    ref = model.generate(prompt, max_new_tokens=6)
    assert new == ref.new_ids[0].tolist()
    assert eng.length == len(ids) + 5


def test_engine_is_reused_and_grown():
    model = nk.tiny("llama", seed=3)
    a = model.lean(10)
    assert a.capacity == 64 and a.mode == "eager"
    a.prefill([1, 2, 3])
    b = model.lean(60)
    assert b is a and b.length == 0
    c = model.lean(65)
    assert c is not a and c.capacity == 128


def test_composition_cache_goes_stale_after_reuse():
    model = nk.tiny("llama", seed=4)
    skill = Skill.compile(model, POLICY, name="policy")
    first = compose(model, PREFIX, [skill], SUFFIX, engine="lean")
    compose(model, PREFIX, [skill], "Other question?", engine="lean")
    with pytest.raises(RuntimeError, match="read Composition.cache before composing again"):
        first.cache
    kept = compose(model, PREFIX, [skill], SUFFIX, engine="lean")
    snap = kept.cache
    compose(model, PREFIX, [skill], "Other question?", engine="lean")
    assert snap.token_ids.tolist() == list(model.tokenize(PREFIX).ids) + skill.token_ids + text_ids(model, SUFFIX)


def test_auto_uses_hf_on_cpu():
    model = model_for("llama")
    skill = Skill.compile(model, POLICY, name="policy")
    assert compose(model, PREFIX, [skill], SUFFIX).engine == "hf"


def test_sequential_gpt_neox_matches_hf():
    model = nk.tiny("gpt_neox", use_parallel_residual=False)
    assert not model.spec.layout.parallel_residual
    ids = _ids(30, seed=3)
    out = LeanEngine(model, 64).prefill(ids, logits="all")
    assert (out - model.hf(ids[None]).logits).abs().max() <= 1e-5


def test_unsupported_and_bad_input_errors():
    dynamic = nk.tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert "not shift-invariant" in lean_support(dynamic)
    with pytest.raises(LeanUnsupportedError, match="use engine='hf'"):
        LeanEngine(dynamic, 16)
    model = model_for("llama")
    with pytest.raises(nk.PositionError, match="exceeds"):
        LeanEngine(model, model.spec.max_positions + 1)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        LeanEngine(model, 16, mode="graph")
    with pytest.raises(ValueError, match="mode 'fast'"):
        LeanEngine(model, 16, mode="fast")
    eng = LeanEngine(model, 64)
    with pytest.raises(nk.PositionError, match="holds 64"):
        eng.prefill(_ids(65))
    with pytest.raises(ValueError, match="outside the filled slots"):
        eng.prefill([1], at=3)
    other = nk.tiny("llama", seed=1)
    foreign = nk.KVCache.prefill(other, "abc")
    with pytest.raises(nk.CacheMismatchError):
        eng.place(foreign)
    with pytest.raises(ValueError, match="engine 'fast'"):
        compose(model, PREFIX, [], SUFFIX, engine="fast")


@pytest.mark.slow
def test_compose_lean_equals_hf_on_smollm2(smollm2):
    skill = Skill.compile(smollm2, POLICY, name="policy")
    hf = compose(smollm2, PREFIX, [skill], SUFFIX, seam=2, engine="hf")
    lean = compose(smollm2, PREFIX, [skill], SUFFIX, seam=2, engine="lean")
    assert (lean.logits - hf.logits).abs().max() <= 1e-4
    assert (lean.cache.keys - hf.cache.keys).abs().max() <= 1e-4


TRITON_PLACE = """
import json, torch, notekv as nk
from notekv.compose import Skill, compose
from notekv.kv.fused import HAVE_TRITON
assert HAVE_TRITON
model = nk.tiny("qwen3")
skill = Skill.compile(model, "Refund policy: refunds within 30 days if unopened.", name="policy")
a = compose(model, "System: be exact.", [skill], "Refund?", engine="lean", backend="triton")
ka = a.cache.keys.clone()
b = compose(model, "System: be exact.", [skill], "Refund?", engine="lean", backend="torch")
print(json.dumps({"logits": float((a.logits - b.logits).abs().max()), "keys": float((ka - b.cache.keys).abs().max())}))
"""


@pytest.mark.slow
def test_lean_place_with_the_triton_kernel():
    """The fused rotation writing into the engine's buffer (capacity > chunk, offset slots),
    run by the Triton kernel under the CPU interpreter, equals the torch reference."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_PLACE], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["logits"] <= 1e-5 and r["keys"] <= 1e-6, r


def test_lean_refuses_inside_a_hook_context():
    model = model_for("llama")
    skill = Skill.compile(model, POLICY, name="policy")
    with model.hooks(nk.Collect("L1.resid_post")):
        with pytest.raises(ValueError, match="engine='hf' inside hook contexts"):
            compose(model, PREFIX, [skill], SUFFIX, engine="lean")
        assert compose(model, PREFIX, [skill], SUFFIX).engine == "hf"
    assert compose(model, PREFIX, [skill], SUFFIX, engine="lean").engine == "lean"


def test_graph_capture_failure_falls_back_with_a_warning(monkeypatch):
    from notekv.lean.graphs import GraphCache

    calls = []

    def forward(ids, qpos, kv_len, logits):
        calls.append((qpos.tolist(), kv_len, logits))
        return torch.ones(1, 3)

    cache = GraphCache(forward)

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cache, "_capture", broken)
    with pytest.warns(RuntimeWarning, match="continues without graphs"):
        out = cache.replay(torch.tensor([[1, 2]]), 5, 64, "last")
    assert torch.equal(out, torch.ones(1, 3)) and calls == [([5, 6], 64, "last")]
    assert not cache.capture and len(cache) == 0
    cache.replay(torch.tensor([[3]]), 7, 64, None)  # later calls run uncaptured, no capture attempt
    assert calls[-1] == ([7], 64, None)


def test_release_lean_and_last_logits():
    model = nk.tiny("llama", seed=5)
    first = model.lean(16)
    model.release_lean()
    assert model.lean(16) is not first
    skill = Skill.compile(model, POLICY, name="policy")
    c = compose(model, PREFIX, [skill], SUFFIX, engine="lean")
    assert torch.equal(c.last_logits, c.logits[:, -1]) and c.last_logits.shape == (1, model.spec.vocab_size)
    assert compose(model, PREFIX, [skill], engine="lean").last_logits is None


def test_forward_from_bad_input():
    from notekv.lean import forward_from

    model = model_for("llama")
    run = model.run(_ids(12)[None], collect=["L1.resid_pre"])
    kv = nk.KVCache.from_run(run, model)
    x = run.acts["L1.resid_pre"][:, 4:]
    with pytest.raises(IndexError, match="layer 9 out of range"):
        forward_from(model, x, 9, torch.arange(4, 12), kv, past_slots=4)
    with pytest.raises(ValueError, match="resid must be"):
        forward_from(model, x[0], 1, torch.arange(4, 12), kv, past_slots=4)
    with pytest.raises(ValueError, match="8 positions for 7 tokens"):
        forward_from(model, x[:, 1:], 1, torch.arange(4, 12), kv, past_slots=4)
    with pytest.raises(ValueError, match="past_slots 13"):
        forward_from(model, x, 1, torch.arange(4, 12), kv, past_slots=13)
    two = nk.KVCache(kv.keys.expand(-1, 2, -1, -1, -1), kv.values.expand(-1, 2, -1, -1, -1), kv.positions,
                     kv.token_ids, kv.segments, kv.fingerprint, kv.rope, kv.max_positions)
    with pytest.raises(ValueError, match="batch-1 cache"):
        forward_from(model, x, 1, torch.arange(4, 12), two, past_slots=4)
    out = forward_from(model, x, 1, torch.arange(4, 12), kv, past_slots=4)
    assert (out - run.logits[:, -1]).abs().max() <= 1e-5
