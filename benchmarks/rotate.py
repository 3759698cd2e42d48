"""Effective bandwidth of the fused KV rotation against a device-to-device copy.

For each cache shape the same run times: a plain copy of the keys (the floor), the fused op
(one launch, all layers: Triton on CUDA, the torch reference elsewhere) and, on CUDA, the
torch reference (eager). Bandwidth counts one read and one write of every key byte.
Prints a table and writes ``benchmarks/results/rotate-<device>.json``.

    python benchmarks/rotate.py            # CUDA if available, else CPU at toy size
    python benchmarks/rotate.py --toy      # tiny shapes (what the tests run)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from notekv.kv.fused import rotate_keys, rotate_keys_reference
from timing import device_tag, median_ms, write_result

SHAPES = {  # name: (layers, kv_heads, head_dim)
    "llama-3.2-1b": (16, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
    "gemma-3-4b": (34, 4, 256),
}
SEQS = (4096, 32768)
TOY_SHAPES = {"toy-64": (2, 2, 64), "toy-128": (2, 2, 128), "toy-256": (2, 1, 256)}
TOY_SEQS = (256,)


def bench(device: torch.device, shapes: dict, seqs, reps: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, (layers, heads, head_dim) in shapes.items():
        for seq in seqs:
            src = torch.randn(layers, 1, heads, seq, head_dim, device=device, dtype=dtype)
            dst = torch.empty_like(src)
            inv = 1.0 / (1e4 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            inv = inv[None].expand(layers, -1).contiguous()
            delta = torch.full((seq,), 1234, dtype=torch.int64)
            idx = torch.arange(seq)
            nbytes = 2 * src.numel() * src.element_size()
            arms = {
                "copy": lambda: dst.copy_(src),
                "fused": lambda: rotate_keys(src, delta, inv, rotary_dim=head_dim, dst=dst),
            }
            if device.type == "cuda":
                arms["eager_reference"] = lambda: rotate_keys_reference(src, dst, delta, inv, idx, idx, head_dim)
            for fn in arms.values():  # warm-up (Triton compiles on first call)
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = {arm: median_ms(fn, reps, device) for arm, fn in arms.items()}
            copy_gbps = nbytes / ms["copy"] / 1e6
            for arm in arms:
                if arm == "copy":
                    continue
                rows.append({
                    "model": name, "arm": arm, "head_dim": head_dim, "seq": seq, "layers": layers,
                    "kv_heads": heads, "bytes": nbytes, "median_ms": ms[arm], "gbps": nbytes / ms[arm] / 1e6,
                    "copy_gbps": copy_gbps, "copy_median_ms": ms["copy"], "ratio_to_copy": ms["copy"] / ms[arm],
                })
            del src, dst
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny shapes (CPU default)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = args.toy or device.type == "cpu"
    rows = bench(device, TOY_SHAPES if toy else SHAPES, TOY_SEQS if toy else SEQS, args.reps, getattr(torch, args.dtype))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (cpu)"
    result = {"gpu": gpu, "device": device.type, "toy": toy, "dtype": args.dtype, "rows": rows}
    print(f"device: {gpu}  dtype: {args.dtype}  median of {args.reps}")
    print(f"{'model':14s} {'arm':16s} {'seq':>6s} {'ms':>9s} {'GB/s':>8s} {'copy GB/s':>10s} {'x copy':>7s}")
    for r in rows:
        print(f"{r['model']:14s} {r['arm']:16s} {r['seq']:6d} {r['median_ms']:9.3f} {r['gbps']:8.1f} "
              f"{r['copy_gbps']:10.1f} {r['ratio_to_copy']:7.2f}")
    write_result(args.out, f"rotate-{device_tag(device, toy)}", result)
    return result


if __name__ == "__main__":
    main()
