"""Layer x position ``resid_pre`` patching sweep: notekv against TransformerLens.

One aligned prompt pair (the ``agent_policy`` scenario on SmolLM2-135M: 154 tokens, the
prompts first differ at token 104). The metric is the answer logit difference.

``notekv``        :func:`notekv.sweep.resid_patch_grid` over the whole grid (every
                  layer x every position; the exact shortcuts skip what cannot change)
``notekv_hooks``  the same function with ``method="hooks"`` (a hooked forward per cell,
                  batched) on the TransformerLens cells
``tl``            ``transformer_lens.patching.generic_activation_patch`` with
                  ``layer_pos_patch_setter`` on the TransformerBridge (one forward per cell),
                  on a subset of cells: layers {0, L/3, 2L/3, L-1} x a spread of positions
                  on both sides of the first difference

All arms must agree cell by cell (max abs difference <= 1e-4 logits). Time per cell is
reported two ways for notekv: over the cells it computed (positions from the first
difference on) and over the whole grid it returned. Prints a table and writes
``benchmarks/results/sweeps-<device>.json``.

    python benchmarks/sweeps.py          # SmolLM2-135M (CPU: about 3 minutes)
    python benchmarks/sweeps.py --toy    # tiny llama (what the tests run)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import notekv as nk
from notekv.sweep import first_diff_of, resid_patch_grid
from timing import write_result

TOLERANCE = 1e-4


def _pair(model, toy: bool):
    if toy:
        g = torch.Generator().manual_seed(0)
        corrupt = torch.randint(0, 250, (40,), generator=g).tolist()
        clean = list(corrupt)
        clean[12] = (clean[12] + 7) % 250
        return corrupt, clean, 65, 66, "random"
    from circuits import scenarios

    pair = scenarios.get("agent_policy").pair(model, 0)
    return list(pair.old_ids), list(pair.new_ids), pair.good, pair.bad, "agent_policy#0"


def _tl_cells(n_layers: int, n: int, first_diff: int) -> tuple[list[int], list[int]]:
    layers = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    tail = list(range(first_diff, n))
    step = max(1, len(tail) // 6)
    positions = sorted({max(0, first_diff - 5), max(0, first_diff - 1), *tail[::step], n - 1})
    return layers, positions


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny random llama instead of SmolLM2")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    import pandas as pd
    from transformer_lens import patching

    from notekv.backends.tl import TLBackend

    model = nk.tiny("llama") if args.toy else nk.load("smollm2-135m")
    corrupt, clean, good, bad, label = _pair(model, args.toy)
    n, L = len(corrupt), model.spec.n_layers
    first_diff = first_diff_of(corrupt, clean)

    def metric(logits):
        return logits[:, good] - logits[:, bad]

    arms = []
    t = time.perf_counter()
    grid = resid_patch_grid(model, corrupt, clean, metric)
    s_grid = time.perf_counter() - t
    computed = L * (n - first_diff)
    arms.append({"arm": "notekv", "cells": L * n, "computed_cells": computed, "seconds": s_grid,
                 "ms_per_cell": 1e3 * s_grid / (L * n), "ms_per_computed_cell": 1e3 * s_grid / computed})

    layers, positions = _tl_cells(L, n, first_diff)
    cells = len(layers) * len(positions)
    t = time.perf_counter()
    hooks = resid_patch_grid(model, corrupt, clean, metric, layers=layers, slots=positions, method="hooks")
    s_hooks = time.perf_counter() - t
    arms.append({"arm": "notekv_hooks", "cells": cells, "computed_cells": cells, "seconds": s_hooks,
                 "ms_per_cell": 1e3 * s_hooks / cells, "ms_per_computed_cell": 1e3 * s_hooks / cells})

    bridge = TLBackend(model).bridge
    corrupt_t, clean_t = torch.tensor([corrupt]), torch.tensor([clean])
    _, clean_cache = bridge.run_with_cache(clean_t)
    index = pd.DataFrame([(l, q) for l in layers for q in positions], columns=["layer", "pos"])
    t = time.perf_counter()
    tl = patching.generic_activation_patch(
        bridge, corrupt_t, clean_cache, lambda lg: lg[0, -1, good] - lg[0, -1, bad],
        patching.layer_pos_patch_setter, "resid_pre", index_axis_names=None, index_df=index,
    ).flatten().float()
    s_tl = time.perf_counter() - t
    arms.append({"arm": "tl", "cells": cells, "computed_cells": cells, "seconds": s_tl,
                 "ms_per_cell": 1e3 * s_tl / cells, "ms_per_computed_cell": 1e3 * s_tl / cells})

    ours = grid[layers][:, positions].flatten()
    diff_tl = float((ours - tl).abs().max())
    diff_hooks = float((ours - hooks.flatten()).abs().max())
    tl_ms = arms[2]["ms_per_cell"]
    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "model": model.name, "pair": label,
        "prompt_tokens": n, "first_diff": first_diff, "layers": L, "metric": "logit(good) - logit(bad)",
        "tl_layers": layers, "tl_positions": positions, "arms": arms,
        "max_abs_diff_vs_tl": diff_tl, "max_abs_diff_vs_hooks": diff_hooks, "tolerance": TOLERANCE,
        "equal": diff_tl <= TOLERANCE and diff_hooks <= TOLERANCE,
        "speedup_per_computed_cell": tl_ms / arms[0]["ms_per_computed_cell"],
        "speedup_per_grid_cell": tl_ms / arms[0]["ms_per_cell"],
        "speedup_hooks_per_cell": tl_ms / arms[1]["ms_per_cell"],
        "metric_range": [float(grid.min()), float(grid.max())],
    }
    print(f"{model.name}: {n} tokens, first difference at {first_diff}, {L} layers, {torch.get_num_threads()} threads")
    print(f"{'arm':13s} {'cells':>6s} {'computed':>9s} {'seconds':>8s} {'ms/cell':>8s} {'ms/computed':>12s}")
    for a in arms:
        print(f"{a['arm']:13s} {a['cells']:6d} {a['computed_cells']:9d} {a['seconds']:8.2f} {a['ms_per_cell']:8.2f} "
              f"{a['ms_per_computed_cell']:12.2f}")
    print(f"max |notekv - tl| = {diff_tl:.2e}, max |notekv - hooks| = {diff_hooks:.2e} (tolerance {TOLERANCE:g})")
    print(f"speed-up per cell vs TransformerLens: {result['speedup_per_computed_cell']:.1f}x over computed cells, "
          f"{result['speedup_per_grid_cell']:.1f}x over the whole grid; hooked batched: "
          f"{result['speedup_hooks_per_cell']:.1f}x")
    write_result(args.out, f"sweeps-{'toy-cpu' if args.toy else 'cpu'}", result)
    if not result["equal"]:
        raise SystemExit(f"the sweeps disagree: {diff_tl:.2e} vs TL, {diff_hooks:.2e} vs hooks (> {TOLERANCE:g})")
    return result


if __name__ == "__main__":
    main()
