"""Time to first token: full prefill vs prefix hit vs composing a precompiled chunk.

A context of ``n_ctx`` tokens is a short system prefix (``prefix`` tokens, always cached)
followed by one chunk (the rest); then a suffix of ``s`` tokens asks for the next token.
Arms (each returns last-token logits; all measured in the same run on the same weights):

``full``         prefill of context + suffix from scratch (HF forward, SDPA, last logits only)
``prefix_hit``   the exact context is cached in the lean engine; only the suffix runs
``compose_hf``   ``notekv.compose(..., engine="hf")``: cached prefix + chunk spliced with the
                 fused rotation into a new cache, suffix through transformers
``compose_lean`` ``notekv.compose(..., engine="lean")``: the same through the lean engine
                 (rotation written into its static buffer, suffix as a CUDA graph)
``erratum``      prefix hit, then an appended erratum (``erratum`` tokens) and the suffix

Models are random-weight Llama-3.2-1B / Llama-3.1-8B shapes in bf16 (weights do not change
the cost). Before timing, a check compares the lean and HF compositions' logits and the
prefix hit against the full prefill. Prints a table with full/arm ratios and writes
``benchmarks/results/ttft-<device>.json``.

    python benchmarks/ttft.py                        # CUDA: 1B and 8B, N in 4k/16k/32k(/64k)
    python benchmarks/ttft.py --models llama-3.1-8b --n-ctx 32768 --suffix 64
    python benchmarks/ttft.py --toy                  # tiny shapes on CPU (what the tests run)
    python benchmarks/ttft.py --models smollm2-135m --n-ctx 1024 2048 --suffix 16 64 --reps 5   # a CPU run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import notekv as nk
from notekv.compose import Skill, compose
from notekv.model.tiny import byte_tokenizer
from timing import device_tag, free_memory, median_ms, write_result

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
    # SmolLM2-135M's shape: small enough to time on a CPU (fp32), not run by default.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}
DEFAULT_MODELS = ("llama-3.2-1b", "llama-3.1-8b")
TOY_SHAPES = {
    "toy-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=259, tie_word_embeddings=False,
                      rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
}
N_CTX = (4096, 16384, 32768, 65536)
SUFFIXES = (64, 512)
TOY_N_CTX = (96, 192)
TOY_SUFFIXES = (8, 24)
ARMS = ("full", "prefix_hit", "compose_hf", "compose_lean", "erratum")


def build(shape: dict, device: torch.device, dtype: torch.dtype, max_positions: int) -> nk.HookedModel:
    """A random-weight Llama-family HookedModel built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", max_position_embeddings=max_positions, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    return nk.HookedModel(hf, byte_tokenizer(), "random")


def fits(model, n_ctx: int, device: torch.device) -> bool:
    """Whether one more context of ``n_ctx`` fits: ~6 copies of its KV plus the full
    prefill's activations (a 14336-wide MLP at n_ctx tokens), with a safety margin."""
    if device.type != "cuda":
        return True
    s = model.spec
    kv = 2 * s.n_layers * s.n_kv_heads * s.head_dim * n_ctx * 2
    act = 4 * n_ctx * model.hf.config.intermediate_size * 2
    free, _ = torch.cuda.mem_get_info()
    return 6 * kv + act < 0.9 * free


def contexts(model, n_ctx: int, prefix: int) -> dict:
    """The context's token ids and its caches: the system prefix, the chunk compiled on its
    own from position 0, and the whole context (what a prefix hit finds)."""
    g = torch.Generator().manual_seed(n_ctx)
    vocab = min(model.spec.vocab_size, 30000)
    ctx = torch.randint(0, vocab, (n_ctx,), generator=g)
    return {
        "ids": ctx,
        "head": nk.KVCache.prefill(model, ctx[:prefix][None]),
        "chunk": Skill("chunk", "", "isolated", nk.KVCache.prefill(model, ctx[prefix:][None])),
        "whole": nk.KVCache.prefill(model, ctx[None]),
    }


def one_config(model, c: dict, s: int, *, erratum: int, reps: int, device, lean_mode: str | None = None
               ) -> tuple[list, dict]:
    n_ctx = len(c["ids"])
    g = torch.Generator().manual_seed(n_ctx + s)
    tail = torch.randint(0, min(model.spec.vocab_size, 30000), (erratum + s,), generator=g)
    fix, suf = tail[:erratum], tail[erratum:]
    full_ids = torch.cat([c["ids"], suf])[None].to(device)
    head, chunk, whole = c["head"], c["chunk"], c["whole"]
    eng = model.lean(n_ctx + erratum + s, mode=lean_mode)  # compose reuses this engine

    def full():
        with torch.no_grad():
            return model.hf(input_ids=full_ids, logits_to_keep=1).logits[:, -1].float()

    def hit():  # the cached context stays in the engine between reps; only the suffix runs
        eng.truncate(n_ctx)
        return eng.prefill(suf)

    def with_erratum():
        eng.truncate(n_ctx)
        return eng.prefill(torch.cat([fix, suf]))

    def compose_hf():
        return compose(model, head, [chunk], suf, engine="hf", logits="last").logits[:, -1].float()

    def compose_lean():
        return compose(model, head, [chunk], suf, engine="lean", logits="last").logits[:, -1]

    # Checks before timing: the lean engine agrees with transformers.
    ref = full()
    eng.place(whole)
    got_hit = hit()
    c_hf, c_lean = compose_hf(), compose_lean()
    eng = model.lean(n_ctx + erratum + s)  # composing emptied it: cache the context again
    eng.place(whole)
    check = {
        "prefix_hit_vs_full_max_abs": float((got_hit - ref).abs().max()),
        "compose_lean_vs_hf_max_abs": float((c_lean - c_hf).abs().max()),
        "logit_scale": float(ref.abs().max()),
        "prefix_hit_argmax_agrees": bool(got_hit.argmax() == ref.argmax()),
        "compose_argmax_agrees": bool(c_lean.argmax() == c_hf.argmax()),
        "lean_mode": eng.mode,
        "cuda_graphs_captured": 0 if eng.graphs is None or not eng.graphs.capture else len(eng.graphs),
    }
    ms = {"full": median_ms(full, reps, device, warmup=1)}
    ms["prefix_hit"] = median_ms(hit, reps, device, warmup=2)
    ms["erratum"] = median_ms(with_erratum, reps, device, warmup=2)
    ms["compose_hf"] = median_ms(compose_hf, reps, device, warmup=1)
    ms["compose_lean"] = median_ms(compose_lean, reps, device, warmup=2)
    rows = [{"n_ctx": n_ctx, "suffix": s, "arm": arm, "median_ms": ms[arm], "speedup_vs_full": ms["full"] / ms[arm]}
            for arm in ARMS]
    return rows, check


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny shapes (the default on CPU without --models)")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--n-ctx", nargs="*", type=int, default=None)
    p.add_argument("--suffix", nargs="*", type=int, default=None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--lean-mode", default=None, choices=["graph", "static", "eager"],
                   help="lean engine mode (default: graph on CUDA, eager elsewhere)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None, help="file name tag (default: the device, e.g. ttft-cuda.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = args.toy or (device.type == "cpu" and not args.models)
    shapes = TOY_SHAPES if toy else SHAPES
    names = args.models or list(TOY_SHAPES if toy else DEFAULT_MODELS)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise SystemExit(f"unknown model shape(s) {unknown}; choose from {sorted(shapes)}")
    n_ctxs = args.n_ctx or (TOY_N_CTX if toy else N_CTX)
    suffixes = args.suffix or (TOY_SUFFIXES if toy else SUFFIXES)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    prefix, erratum = (8, 8) if toy else (32, 32)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (cpu)"
    rows, checks, skipped = [], [], []
    for name in names:
        model = build(shapes[name], device, dtype, max(n_ctxs) + max(suffixes) + erratum + 1024)
        for n in n_ctxs:
            if not fits(model, n, device):
                skipped.append({"model": name, "n_ctx": n, "reason": "not enough GPU memory"})
                print(f"{name} n_ctx={n}: skipped (memory)")
                continue
            ctx = contexts(model, n, prefix)
            for s in suffixes:
                r, c = one_config(model, ctx, s, erratum=erratum, reps=args.reps, device=device,
                                  lean_mode=args.lean_mode)
                rows += [{"model": name, **x} for x in r]
                checks.append({"model": name, "n_ctx": n, "suffix": s, **c})
                by = {x["arm"]: x for x in r}
                print(f"{name:13s} N={n:6d} s={s:4d} " + " ".join(
                    f"{a}={by[a]['median_ms']:.2f}ms({by[a]['speedup_vs_full']:.1f}x)" for a in ARMS), flush=True)
            del ctx
            model.release_lean()
            free_memory(device)
        del model
        free_memory(device)
    result = {"gpu": gpu, "device": device.type, "toy": toy, "dtype": str(dtype).replace("torch.", ""),
              "reps": args.reps, "lean_mode": args.lean_mode or ("graph" if device.type == "cuda" else "eager"),
              "prefix_tokens": prefix, "erratum_tokens": erratum, "rows": rows, "checks": checks, "skipped": skipped}
    print(f"\ndevice: {gpu}  dtype: {result['dtype']}  median of {args.reps}")
    print(f"{'model':13s} {'N':>6s} {'s':>4s} {'arm':13s} {'ms':>10s} {'full/arm':>9s}")
    for r in rows:
        print(f"{r['model']:13s} {r['n_ctx']:6d} {r['suffix']:4d} {r['arm']:13s} {r['median_ms']:10.2f} "
              f"{r['speedup_vs_full']:9.1f}")
    write_result(args.out, f"ttft-{args.tag or device_tag(device, toy)}", result)
    return result


if __name__ == "__main__":
    main()
