"""The full KV map of one pair: attribution (one decode step + one backward pass) against
exact patching (one decode row per cell), by prompt length.

The pair: the refund gate's field line first (``order_status: delivered`` vs ``cancelled``),
then few-shot example lines up to the target length, then the query; so nearly every slot
of the cache lies after the first difference and the map has ``L x (S - first_diff)`` live
cells (cells before it cannot move the decision and no method computes them).

``attribution``  :func:`notekv.attribution.attribute_kv`, every (layer, KV head, slot) at once
``exact``        :func:`notekv.attribution.exact_kv` on a sample of live (layer, slot) cells:
                 the half of largest estimate and a random half (rows per forward bounded by
                 the KV byte budget); the full map's time is the sample's cells per second
                 extrapolated to every live cell

Both start from the two prefilled caches (the prefill is common to both and not timed).
The sample's exact values also give the estimate's agreement with exact patching: Spearman
over the sample and over its random half, top-8/32 overlap, recall of the exact top 8 within
the estimate's top 32.
Prints a table and writes ``benchmarks/results/attribution-<device>.json``.

    python benchmarks/attribution.py                 # SmolLM2-135M at 256 / 1k / 4k tokens
    python benchmarks/attribution.py --toy           # tiny llama (what the tests run)
    python benchmarks/attribution.py --agreement 8   # full-map agreement, both bundled models
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import notekv as nk
from notekv.attribution import agreement, attribute_kv, exact_kv
from notekv.kv import KVCache
from notekv.sweep import first_diff_of
from timing import free_memory, write_result

LENGTHS = (256, 1024, 4096)


def _pair(model, n_tokens: int, seed: int = 0):
    """OLD/NEW ids of about ``n_tokens`` tokens, the field near the start, and the answers."""
    from circuits import scenarios

    sc = scenarios.get("refund")
    rng = random.Random(seed)
    values = list(sc.positive_values + sc.negative_values)

    def line(value, answer):
        return (sc.example.replace("{value}", value).replace("{answer}", answer.strip())
                .replace("{id}", str(rng.randint(1000, 9999))).replace("{name}", rng.choice(sc.names)))

    head = f"{sc.policy}\nOrder #4411: order_status: "
    query = "Order #4411 is the one above. Customer Ana wants a refund. -> refund"
    examples = ""
    budget = n_tokens - len(model.tokenizer(head + "delivered.\n" + query)["input_ids"])
    while True:
        v = rng.choice(values)
        nxt = examples + line(v, sc.answers["positive" if v in sc.positive_values else "negative"])
        if len(model.tokenizer(nxt)["input_ids"]) > budget:
            break
        examples = nxt
    ids = [model.tokenizer(head + v + ".\n" + examples + query)["input_ids"] for v in ("delivered", "cancelled")]
    if len(ids[0]) != len(ids[1]):
        raise SystemExit("the two values tokenise to different lengths on this model")
    return ids[0], ids[1], model.token_id(sc.answers["positive"]), model.token_id(sc.answers["negative"])


def _toy_pair(n_tokens: int):
    g = torch.Generator().manual_seed(n_tokens)
    old = torch.randint(3, 250, (n_tokens,), generator=g).tolist()
    new = list(old)
    new[3] = (new[3] + 7) % 250 + 3
    return old, new, 40, 41


def measure(model, old, new, good, bad, sample: int, seed: int = 0) -> dict:
    caches = [KVCache.from_run(model.run(torch.tensor([ids[:-1]]), logits="last"), model) for ids in (old, new)]
    L, S = model.spec.n_layers, len(caches[0])
    d = first_diff_of(old, new)
    live = [(l, q) for l in range(L) for q in range(d, S)]
    attribute_kv(model, caches[0].select(range(8)), caches[1].select(range(8)), old[-1], good, bad)  # warm-up
    t = time.perf_counter()
    att = attribute_kv(model, caches[0], caches[1], old[-1], good, bad)
    s_attr = time.perf_counter() - t
    est_all = att.cells()[0]
    top = sorted(live, key=lambda c: -abs(float(est_all[c])))[: sample // 2]
    chosen = set(top)
    rest = [c for c in live if c not in chosen]
    cells = top + random.Random(seed).sample(rest, min(sample - len(top), len(rest)))
    t = time.perf_counter()
    exact = exact_kv(model, caches[0], caches[1], old[-1], good, bad, cells)
    s_exact = time.perf_counter() - t
    est = torch.tensor([float(est_all[c]) for c in cells])
    agree = agreement(est, exact)
    rate_exact = len(cells) / s_exact
    full_exact = len(live) / rate_exact
    return {"tokens": len(old), "first_diff": d, "layers": L, "live_cells": len(live),
            "kv_heads": model.spec.n_kv_heads, "attribution_s": s_attr,
            "attribution_cells_per_s": len(live) / s_attr,
            "exact_sample_cells": len(cells), "exact_sample_s": s_exact, "exact_cells_per_s": rate_exact,
            "exact_full_map_s_extrapolated": full_exact, "speedup_full_map": full_exact / s_attr,
            "rows_per_exact_forward": caches[0].rows_within(),
            "spearman_on_sample": agree["spearman"], "top8_overlap": agree["top8_overlap"],
            "recall8_at_32": agree["recall8_at_32"], "top32_overlap": agree["top32_overlap"],
            "spearman_on_random_half": agreement(est[len(top):], exact[len(top):])["spearman"]}


def agreement_on_scenario(model, scenario: str, n_pairs: int, seed: int = 0) -> dict:
    """Every live (layer, slot) cell of ``n_pairs`` distinct usable pairs patched exactly and
    estimated (key-fixed and plain): agreement per pair, then over pairs with bootstrap
    intervals; also per slot (all layers patched together)."""
    from circuits import scenarios
    from circuits.pairstate import prefill_pair
    from notekv.attribution import summarize

    sc, _ = scenarios.get(scenario).usable(model)
    pairs = list({(p.old_ids, p.new_ids): p for p in sc.pairs(model, 4 * n_pairs, seed=seed)}.values())
    per = {"key_fixed": [], "no_key_fix": [], "positions": []}
    used = 0
    for p in pairs:
        st = prefill_pair(model, p)
        if abs(st.swing) < 0.5:
            continue
        att = attribute_kv(model, st.old, st.new, p.old_ids[-1], p.good, p.bad)
        down = range(min(p.span_slots), st.n_ctx)
        cells = [(l, q) for l in range(model.spec.n_layers) for q in down]
        exact = exact_kv(model, st.old, st.new, p.old_ids[-1], p.good, p.bad, cells)
        for name, part in (("key_fixed", "kv"), ("no_key_fix", "kv_plain")):
            est = att.cells(part)[0]
            per[name].append(agreement(torch.tensor([float(est[c]) for c in cells]), exact))
        pos_exact = exact_kv(model, st.old, st.new, p.old_ids[-1], p.good, p.bad, [(None, q) for q in down])
        per["positions"].append(agreement(att.positions()[0][list(down)], pos_exact))
        used += 1
        if used == n_pairs:
            break
    return {"model": model.name, "scenario": scenario, "n_pairs": used,
            **{k: summarize(v, seed=seed) for k, v in per.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny random llama at 64 / 128 tokens")
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="prompt lengths (default 256 1024 4096)")
    p.add_argument("--sample", type=int, default=64, help="live cells patched exactly per length (default 64)")
    p.add_argument("--agreement", type=int, default=0, metavar="N",
                   help="instead: the full-map agreement with exact patching on N pairs of the refund and access "
                        "scenarios, on both bundled models (attribution-agreement-cpu.json)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.agreement:
        rows = []
        for name in ("smollm2-135m", "gemma3-270m"):
            model = nk.load(name)
            for scenario in ("refund", "access"):
                r = agreement_on_scenario(model, scenario, args.agreement)
                rows.append(r)
                k, pl, po = r["key_fixed"], r["no_key_fix"], r["positions"]
                print(f"{name:13s} {scenario:7s} n={r['n_pairs']:2d} cells: Spearman {k['spearman']['mean']:.3f} "
                      f"{[round(x, 3) for x in k['spearman']['ci']]} (no key fix {pl['spearman']['mean']:.3f}), "
                      f"top-8 {k['top8_overlap']['mean']:.2f} (no key fix {pl['top8_overlap']['mean']:.2f}), "
                      f"top-32 {k['top32_overlap']['mean']:.2f}, recall8@32 {k['recall8_at_32']['mean']:.2f}; "
                      f"slots: Spearman {po['spearman']['mean']:.3f}, top-8 {po['top8_overlap']['mean']:.2f}")
            free_memory(model.device)
        write_result(args.out, "attribution-agreement-cpu", {"threads": torch.get_num_threads(), "rows": rows})
        return {"rows": rows}
    model = nk.tiny("llama") if args.toy else nk.load("smollm2-135m")
    lengths = args.lengths or ((64, 128) if args.toy else LENGTHS)
    rows = []
    for n in lengths:
        pair = _toy_pair(n) if args.toy else _pair(model, n)
        rows.append(measure(model, *pair, sample=args.sample))
        free_memory(model.device)
    result = {"device": model.device.type, "threads": torch.get_num_threads(), "model": model.name,
              "dtype": str(model.dtype), "sample": args.sample, "rows": rows}
    print(f"{model.name}, {torch.get_num_threads()} threads: the full KV map ((layer, slot) cells after the first "
          "difference), attribution vs exact")
    print(f"{'tokens':>7s} {'cells':>7s} {'attr s':>8s} {'attr cells/s':>13s} {'exact cells/s':>14s} "
          f"{'exact full s':>13s} {'speed-up':>9s} {'rho':>6s} {'rho rnd':>7s} {'top8':>5s}")
    for r in rows:
        print(f"{r['tokens']:7d} {r['live_cells']:7d} {r['attribution_s']:8.2f} {r['attribution_cells_per_s']:13.0f} "
              f"{r['exact_cells_per_s']:14.1f} {r['exact_full_map_s_extrapolated']:13.0f} "
              f"{r['speedup_full_map']:8.0f}x {r['spearman_on_sample']:6.3f} {r['spearman_on_random_half']:7.3f} "
              f"{r['top8_overlap']:5.2f}")
    write_result(args.out, f"attribution-{'toy-cpu' if args.toy else model.device.type}", result)
    return result


if __name__ == "__main__":
    main()
