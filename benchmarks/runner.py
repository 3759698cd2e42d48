"""Exact KV patching through the one batched runner: its two paths, side by side.

On one aligned pair (the refund gate lengthened to ``--tokens``, default 1024, on
SmolLM2-135M) and the same cells:

``exact_kv``   :func:`notekv.attribution.exact_kv` on a sample of live (layer, slot) cells
               (``--sample``, default 64), one cell per row
``battery``    the KV battery's rows on that pair (regions, every field-onward slot, every
               layer, suffix/prefix fractions): :func:`circuits.pairstate.decide`

each through ``method="hooks"`` (mixed caches as per-row :class:`~notekv.KVPatch`
interventions through the plan) and ``method="lean"`` (the lean layer loop mixing each
layer's K/V as it runs). Arms alternate within one process (``--reps`` rounds) and must
agree within 3e-5 logits. Prints a table and writes ``benchmarks/results/runner-<device>.json``.

    python benchmarks/runner.py              # SmolLM2-135M, 1024 tokens (CPU: about a minute)
    python benchmarks/runner.py --toy        # tiny llama (what the tests run)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import notekv as nk
from notekv.attribution import exact_kv
from notekv.sweep import first_diff_of
from timing import free_memory, write_result

TOLERANCE = 3e-5
ARMS = ("hooks", "lean")


def _state(model, scenario: str, tokens: int):
    from circuits import scenarios
    from circuits.pairstate import prefill_pair

    sc, _ = scenarios.get(scenario).usable(model)
    fitted = sc.fit(model, tokens, 0)
    return prefill_pair(model, fitted.pair(model, 0))


def _battery_masks(st) -> torch.Tensor:
    """The KV battery's rows for one pair (what :func:`circuits.sweeps.kv_battery` decides)."""
    import math

    from circuits.pairstate import slot_mask
    from circuits.sweeps import FRACTIONS

    down, after = st.field_onward, st.downstream
    masks = [slot_mask(st, []), slot_mask(st, st.pair.span_slots), slot_mask(st, down), slot_mask(st, after)]
    masks += [slot_mask(st, [q]) for q in down]
    masks += [slot_mask(st, down, layers=[l]) for l in range(st.old.n_layers)]
    n = len(down)
    masks += [slot_mask(st, down[n - max(1, math.ceil(f * n)):]) for f in FRACTIONS]
    masks += [slot_mask(st, down[: max(1, math.ceil(f * n))]) for f in FRACTIONS]
    return torch.stack(masks)


def measure(model, st, sample: int, reps: int, seed: int = 0) -> dict:
    from circuits.pairstate import decide

    p = st.pair
    L = st.old.n_layers
    d = first_diff_of(p.old_ids, p.new_ids)
    live = [(l, q) for l in range(L) for q in range(d, st.n_ctx)]
    cells = random.Random(seed).sample(live, min(sample, len(live)))
    masks = _battery_masks(st)
    jobs = {
        "exact_kv": lambda m: exact_kv(model, st.old, st.new, p.old_ids[-1], p.good, p.bad, cells, method=m),
        "battery": lambda m: decide(model, st, masks, method=m),
    }
    rows = []
    for name, job in jobs.items():
        for arm in ARMS:  # warm-up, and the values compared
            job(arm)
        times = {arm: [] for arm in ARMS}
        values = {}
        for _ in range(reps):
            for arm in ARMS:
                t = time.perf_counter()
                values[arm] = job(arm)
                times[arm].append(time.perf_counter() - t)
        diff = float((values["hooks"] - values["lean"]).abs().max())
        if diff > TOLERANCE:
            raise SystemExit(f"{name}: the hooked and lean paths differ by {diff:.2e} logits")
        med = {arm: statistics.median(times[arm]) for arm in ARMS}
        rows.append({"job": name, "tokens": len(p.old_ids), "rows": len(values["hooks"]), "hooks_s": med["hooks"],
                     "lean_s": med["lean"], "speedup": med["hooks"] / med["lean"], "max_abs_diff": diff})
    return {"rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny random llama at 400 tokens")
    p.add_argument("--scenario", default="refund", help="built-in name or TOML file (default refund)")
    p.add_argument("--tokens", type=int, default=1024, help="prompt length (default 1024)")
    p.add_argument("--sample", type=int, default=64, help="cells of exact_kv (default 64)")
    p.add_argument("--reps", type=int, default=3, help="alternating rounds per arm (default 3)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    model = nk.tiny("llama") if args.toy else nk.load("smollm2-135m")
    st = _state(model, args.scenario, 400 if args.toy else args.tokens)
    result = {"device": model.device.type, "threads": torch.get_num_threads(), "model": model.name,
              "dtype": model.dtype_name, **measure(model, st, args.sample, args.reps)}
    free_memory(model.device)
    print(f"{model.name}, {result['threads']} threads: exact KV patching through the runner, hooked vs lean path")
    print(f"{'job':>9s} {'tokens':>7s} {'rows':>5s} {'hooks s':>8s} {'lean s':>8s} {'speed-up':>9s} {'max diff':>9s}")
    for r in result["rows"]:
        print(f"{r['job']:>9s} {r['tokens']:7d} {r['rows']:5d} {r['hooks_s']:8.3f} {r['lean_s']:8.3f} "
              f"{r['speedup']:8.2f}x {r['max_abs_diff']:9.1e}")
    write_result(args.out, f"runner-{'toy-cpu' if args.toy else model.device.type}", result)
    return result


if __name__ == "__main__":
    main()
