"""KVCache, per-layer RoPE repositioning, splicing, storage and the fused rotation op."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import notekv as nk
from notekv.kv import CacheFileError, CacheMismatchError, KVCache, PositionError, UnsupportedRopeError
from notekv.kv.fused import rotate_keys
from notekv.kv.rope import RopeSpec, rotate
from tests.conftest import TINY_ARCHS, tiny_model

TEXT = "order_status: shipped. Refund request: granted? Let us see."
DELTAS = (1, 37, 511, 513, 4000)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def shift_errors(model, text: str, delta: int) -> dict[str, float]:
    """Max relative key error per layer type: prefill at +delta, move back, compare with +0."""
    base = KVCache.prefill(model, text)
    back = KVCache.prefill(model, text, offset=delta).reposition(-delta)
    assert torch.equal(back.positions, base.positions)
    out: dict[str, float] = {}
    for l, kind in enumerate(model.spec.layer_types):
        out[kind] = max(out.get(kind, 0.0), _rel(back.keys[l], base.keys[l]))
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS + ["llama3"])
@pytest.mark.parametrize("delta", DELTAS)
def test_shift_invariance_tiny(arch, delta):
    errs = shift_errors(tiny_model(arch), TEXT, delta)
    assert max(errs.values()) <= 1e-4, errs
    if arch == "gemma3_text":
        assert set(errs) == {"sliding_attention", "full_attention"}


@pytest.mark.slow
@pytest.mark.parametrize("delta", DELTAS)
def test_shift_invariance_real(smollm2, gemma3, delta):
    for model in (smollm2, gemma3):
        errs = shift_errors(model, TEXT, delta)
        assert max(errs.values()) <= 1e-4, (model.name, errs)


def test_unshifted_keys_really_differ():
    """The shift test can fail: keys prefilled at +37 are far from keys at +0 before the move."""
    model = tiny_model("llama")
    assert _rel(KVCache.prefill(model, TEXT, offset=37).keys, KVCache.prefill(model, TEXT).keys) > 0.1


def test_round_trip_and_repeated_moves_do_not_accumulate():
    model = tiny_model("gemma3_text")
    base = KVCache.prefill(model, TEXT)
    there_and_back = base.reposition(37).reposition(-37)
    assert float((there_and_back.keys - base.keys).abs().max()) <= 1e-5
    one = base.reposition(70)
    ten = base
    for _ in range(10):
        ten = ten.reposition(7)
    assert torch.equal(ten.keys, one.keys) and torch.equal(ten.positions, one.positions)
    # Chaining rotations without the stored original does accumulate rounding.
    spec = base.rope[0]
    chained = base.keys[0].to(torch.bfloat16)
    for _ in range(10):
        chained = rotate(chained, 7, spec)
    once = rotate(base.keys[0].to(torch.bfloat16), 70, spec)
    assert float((chained.float() - one.keys[0]).abs().max()) > float((once.float() - one.keys[0]).abs().max())


def test_yarn_attention_factor_is_not_applied_twice():
    model = tiny_model("qwen3")
    assert model.spec.rope[0].attention_factor > 1.1
    base = KVCache.prefill(model, TEXT)
    moved = KVCache.prefill(model, TEXT, offset=100).reposition(-100)
    norms = base.keys.norm(dim=-1), moved.keys.norm(dim=-1)
    assert torch.allclose(norms[0], norms[1], rtol=1e-5)


def test_gemma_layers_rotate_with_their_own_base():
    model = tiny_model("gemma3_text")
    base = KVCache.prefill(model, TEXT)
    moved = base.reposition(50)
    local, glob = model.spec.rope[0], model.spec.rope[3]
    assert torch.allclose(moved.keys[0], rotate(base.keys[0], 50, RopeSpec.from_facts(local)), atol=1e-6)
    assert torch.allclose(moved.keys[3], rotate(base.keys[3], 50, RopeSpec.from_facts(glob)), atol=1e-6)
    assert not torch.allclose(moved.keys[3], rotate(base.keys[3], 50, RopeSpec.from_facts(local)), atol=1e-3)


def test_interleaved_pairing_matches_complex_rotation():
    inv = tuple((1e4 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)).tolist())
    spec = RopeSpec("default", 1e4, 8, 10, "interleaved", 1.0, inv)
    k = torch.randn(2, 5, 10)
    out = rotate(k, 3, spec)
    z = torch.view_as_complex(k[..., :8].reshape(2, 5, 4, 2).contiguous())
    turn = torch.polar(torch.ones(4), 3 * torch.tensor(spec.inv_freq, dtype=torch.float32))
    expect = torch.view_as_real(z * turn).reshape(2, 5, 8)
    assert torch.allclose(out[..., :8], expect, atol=1e-5)
    assert torch.equal(out[..., 8:], k[..., 8:])  # past rotary_dim: untouched


def test_dynamic_ntk_is_refused():
    model = nk.tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    cache = KVCache.prefill(model, "abc")
    with pytest.raises(UnsupportedRopeError, match="not shift-invariant"):
        cache.reposition(3)


def test_cut_and_splice_back_reproduces_full_forward():
    for arch in TINY_ARCHS:
        model = tiny_model(arch)
        prefix, chunk, suffix = "System: be nice.", " Policy: refunds if delivered.", " Q: ok?"
        full = model.run(prefix + chunk + suffix)
        n_p, n_c = len(model.tokenize(prefix)), len(model.tokenize(prefix + chunk))
        both = KVCache.from_run(model.run(prefix + chunk), model)
        cut = both.select(range(n_p, n_c)).reposition(-n_p)  # as if stored at 0..N-1
        assert int(cut.positions[0]) == 0
        spliced = nk.splice(model, [both.select(range(n_p)), cut])
        out = model.run(full.ids[:, n_c:], past=spliced)
        assert float((out.logits[0, -1] - full.logits[0, -1]).abs().max()) <= 1e-5, arch


@pytest.mark.slow
def test_cut_and_splice_back_real(smollm2):
    prefix, chunk, suffix = "You are a support agent.", "\nRefunds are allowed only if delivered.", "\nDecision:"
    full = smollm2.run(prefix + chunk + suffix)
    n_p, n_c = len(smollm2.tokenize(prefix)), len(smollm2.tokenize(prefix + chunk))
    assert smollm2.tokenize(prefix + chunk).ids[:n_p] == smollm2.tokenize(prefix).ids
    both = KVCache.from_run(smollm2.run(prefix + chunk), smollm2)
    spliced = nk.splice(smollm2, [both.select(range(n_p)), both.select(range(n_p, n_c)).reposition(-n_p)])
    out = smollm2.run(full.ids[:, n_c:], past=spliced)
    assert float((out.logits[0, -1] - full.logits[0, -1]).abs().max()) <= 1e-5


def test_splice_texts_chunks_seam_and_generate():
    model = tiny_model("llama")
    chunk = KVCache.prefill(model, " Policy: only if delivered.", segment="policy")
    spliced = nk.splice(model, ["System.", chunk, " Q?"], seam=0)
    assert spliced.segments[0] == "text0" and "policy" in spliced.segments
    assert torch.equal(spliced.positions, torch.arange(len(spliced)))
    # seam=K recomputes the chunk's first K tokens against the real prefix; later ones stay spliced.
    repaired = nk.splice(model, ["System.", chunk], seam=2)
    plain = nk.splice(model, ["System.", chunk])
    n0 = len(model.tokenize("System."))
    full = KVCache.from_run(model.run(torch.tensor([plain.token_ids.tolist()])), model)
    assert torch.allclose(repaired.keys[:, :, :, n0 : n0 + 2], full.keys[:, :, :, n0 : n0 + 2], atol=1e-5)
    assert not torch.allclose(plain.keys[:, :, :, n0 : n0 + 2], full.keys[:, :, :, n0 : n0 + 2], atol=1e-3)
    assert torch.equal(repaired.keys[:, :, :, n0 + 2 :], plain.keys[:, :, :, n0 + 2 :])
    before = spliced.keys.clone()
    gen = model.generate(" A:", past=spliced, max_new_tokens=5)
    # the reference: greedy decoding step by step through model.run over the same spliced cache
    manual, past, step = [], spliced, " A:"
    for _ in range(5):
        run = model.run(step, past=past, logits="last")
        manual.append(int(run.logits[0, -1].argmax()))
        past, step = run, [manual[-1]]
    assert gen.new_ids[0].tolist() == manual
    assert torch.equal(spliced.keys, before)  # the shared cache is never written
    n = len(spliced)  # the generation's cache is a KVCache continuing the spliced one
    assert isinstance(gen.kv, KVCache) and len(gen.kv) == n + len(model.tokenize(" A:", start=n)) + 4
    assert torch.equal(gen.kv.keys[:, :, :, :n], spliced.keys) and gen.kv.segments[:n] == spliced.segments
    assert gen.kv.token_ids[n:].tolist()[-4:] == manual[:4]


def test_preallocated_room_decodes_like_concatenation():
    model = tiny_model("gemma3_text")
    cache = KVCache.prefill(model, TEXT)
    a = model.generate(" ok", past=cache, max_new_tokens=6)
    hf_plain = cache.to_hf()
    assert hf_plain.layers[0].keys.data_ptr() == cache.keys[0].data_ptr()  # no copy
    run_plain = model.run(" ok", past=cache)
    run_room = model.run(" ok", past=cache.to_hf(room=8))
    assert torch.equal(run_plain.logits, run_room.logits)
    b = model.generate(" ok", past=KVCache.prefill(model, TEXT), max_new_tokens=6)
    assert torch.equal(a.new_ids, b.new_ids)


def test_cache_ops_are_copy_on_write():
    model = tiny_model("llama")
    a = KVCache.prefill(model, TEXT)
    b = KVCache.prefill(model, TEXT.replace("shipped", "stopped"))
    keys, values = a.keys.clone(), a.values.clone()
    p = a.patch(b, [15, 16], layers=[1], which="k")
    assert torch.equal(a.keys, keys) and torch.equal(a.values, values)
    assert torch.equal(p.keys[1, :, :, [15, 16]], b.keys[1, :, :, [15, 16]])
    assert torch.equal(p.keys[0], a.keys[0]) and p.values is a.values
    s = a.select([0, 1, 2])
    assert len(s) == 3 and torch.equal(s.keys, a.keys[..., :3, :])
    d = a.drop([0])
    assert len(d) == len(a) - 1 and torch.equal(d.token_ids, a.token_ids[1:])
    c = s.concat(d)
    assert len(c) == 3 + len(d) and c.segments == s.segments + d.segments
    assert torch.equal(a.keys, keys)


def test_caches_of_another_model_are_refused(tmp_path):
    a, b = tiny_model("llama"), nk.tiny("llama", seed=1)
    ca, cb = KVCache.prefill(a, "abc"), KVCache.prefill(b, "abc")
    with pytest.raises(CacheMismatchError, match="another model"):
        b.run("d", past=ca)
    with pytest.raises(CacheMismatchError, match="different models"):
        ca.concat(cb)
    with pytest.raises(CacheMismatchError, match="another model"):
        nk.splice(b, ["x", ca])
    path = ca.save(tmp_path / "a.nkv")
    with pytest.raises(CacheMismatchError, match="another model"):
        KVCache.load(path, b)


def test_splice_past_max_positions_is_refused():
    model = nk.tiny("llama", max_position_embeddings=64)
    chunk = KVCache.prefill(model, "x" * 40)
    with pytest.raises(PositionError, match="positions 0..63"):
        nk.splice(model, [chunk, chunk])
    with pytest.raises(PositionError, match="outside the model"):
        chunk.reposition(30)


def test_save_load_bit_exact_and_corruption(tmp_path):
    model = tiny_model("qwen3")
    cache = KVCache.prefill(model, TEXT, segment="doc").reposition(5)
    path = cache.save(tmp_path / "c.nkv")
    back = KVCache.load(path, model)
    for name in ("keys", "values", "positions", "token_ids", "origin_keys", "origin_positions"):
        assert torch.equal(getattr(back, name), getattr(cache, name)), name
    assert back.segments == cache.segments and back.rope == cache.rope
    raw = path.read_bytes()
    (tmp_path / "trunc.nkv").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CacheFileError, match="truncated or corrupt"):
        KVCache.load(tmp_path / "trunc.nkv", model)
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.nkv").write_bytes(bytes(flipped))
    with pytest.raises(CacheFileError, match="checksum mismatch"):
        KVCache.load(tmp_path / "flip.nkv", model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.nkv"))
    with pytest.raises(CacheFileError, match="not a notekv cache"):
        KVCache.load(tmp_path / "other.nkv", model)
    with pytest.raises(CacheFileError, match="no cache file"):
        KVCache.load(tmp_path / "missing.nkv", model)


def test_sliding_window_hf_cache_is_refused():
    from transformers import DynamicCache

    model = nk.tiny("gemma3_text")
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([model.tokenize(TEXT).ids]),
                       past_key_values=DynamicCache(config=model.hf.config), use_cache=True)
    with pytest.raises(CacheMismatchError, match="dropped tokens"):
        KVCache.from_hf(out.past_key_values, model, model.tokenize(TEXT).ids)


# ---------------------------------------------------------------- the fused op
def test_fused_reference_per_token_and_in_place():
    torch.manual_seed(0)
    src = torch.randn(2, 1, 3, 10, 8)
    inv = torch.rand(2, 4, dtype=torch.float64)
    delta = torch.randint(-100, 100, (10,))
    out = rotate_keys(src, delta, inv, rotary_dim=8, dst=torch.empty_like(src), backend="torch")
    for l in range(2):
        spec = RopeSpec("default", 0.0, 8, 8, "half", 1.0, tuple(inv[l].tolist()))
        for t in range(10):
            assert torch.allclose(out[l, :, :, t], rotate(src[l, :, :, t : t + 1], delta[t], spec)[:, :, 0], atol=1e-6)
    inplace = src.clone()
    rotate_keys(inplace, delta, inv, rotary_dim=8, backend="torch")
    assert torch.equal(inplace, out)
    with pytest.raises(ValueError, match="inv_freq must be"):
        rotate_keys(src, 1, inv[:, :2], rotary_dim=8)
    with pytest.raises(IndexError, match="out of range"):
        rotate_keys(src, 1, inv, rotary_dim=8, src_index=torch.tensor([10]))


TRITON_CHECK = textwrap.dedent("""
    import torch, json
    from notekv.kv.fused import rotate_keys
    results = []
    for seed, dtype, (D, R, pairing) in [
        (1, torch.float32, (16, 16, "half")), (2, torch.float32, (16, 4, "half")),
        (3, torch.float32, (32, 32, "interleaved")), (4, torch.float32, (64, 64, "half")),
        (5, torch.bfloat16, (64, 64, "half")), (6, torch.bfloat16, (256, 256, "half")),
        (7, torch.bfloat16, (16, 4, "half"))]:
        g = torch.Generator().manual_seed(seed)
        L, B, H, S = 3, 1, 2, 24
        src = torch.randn(L, B, H, S, D, generator=g).to(dtype)
        inv = 1.0 / (torch.tensor([1e4, 1e6, 1e4], dtype=torch.float64)[:, None]
                     ** (torch.arange(0, R, 2, dtype=torch.float64) / R)[None, :])
        delta = torch.randint(-5000, 5000, (16,), generator=g)
        sidx = torch.randperm(S, generator=g)[:16]
        didx = torch.randperm(40, generator=g)[:16]
        outs = []
        for backend in ("torch", "triton"):
            dst = torch.full((L, B, H, 40, D), float("nan"), dtype=dtype)  # poisoned
            rotate_keys(src, delta, inv, rotary_dim=R, pairing=pairing, dst=dst, src_index=sidx,
                        dst_index=didx, backend=backend)
            outs.append(dst.float())
        ref, tri = outs
        written = ~torch.isnan(ref)
        same_nan = bool(torch.equal(written, ~torch.isnan(tri)))
        d = (ref[written] - tri[written])
        results.append({"dtype": str(dtype), "D": D, "R": R, "pairing": pairing, "same_nan": same_nan,
                        "max_abs": float(d.abs().max()), "rel_norm": float(d.norm() / ref[written].norm()),
                        "written": int(written.sum())})
    print(json.dumps(results))
""")


@pytest.mark.skipif(not nk.kv.HAVE_TRITON, reason="triton is not installed (pip install -e '.[dev]')")
def test_triton_kernel_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert r["same_nan"] and r["written"] == 3 * 2 * 16 * r["D"], r
        if r["dtype"] == "torch.float32":
            assert r["max_abs"] <= 1e-6, r
        else:
            assert r["rel_norm"] <= 2.5e-3, r
