"""The notes graph of one pair at long context: edge attribution of every edge, then exact
direct path patching of only the edges attribution keeps (pruning before exact checks).

The pair is the attribution benchmark's (``benchmarks/attribution.py``): the refund gate's
field line first, few-shot example lines up to the target length, then the query, so nearly
every slot lies after the field and the graph has ``L*C + L*C*Hq + L*Hq`` edges (``C`` cells
from the field on).

Stages, each timed (seconds) with the process's peak RSS after it:

``prefill``      OLD and NEW caches (the shared prefix once)
``decision``     OLD's decision step, kept for the frozen-head recomputation
``attribution``  every edge under EAP, EAP with the key fix and EAP-IG (``--steps``)
``exact``        direct path patching of ``--sample`` edges: half the IG estimate's largest,
                 half at random (its rate, extrapolated to every edge, is the cost of exact
                 path patching of the whole graph)
``node_kv``      one node-level KV attribution (:func:`notekv.attribute_kv`) of the same
                 caches, for the ratio graph / node-level attribution

    python benchmarks/circuit_graph.py               # SmolLM2-135M at 1k and 4k tokens
    python benchmarks/circuit_graph.py --toy         # tiny llama (what the tests run)

Prints a table and writes ``benchmarks/results/circuit_graph-<device>.json``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

import notekv as nk
from notekv.attribution import agreement, attribute_kv
from notekv.graph.api import _prefill
from notekv.graph.edges import EdgeIndex, attribute, exact_edges
from notekv.graph.readout import decision
from notekv.sweep import first_diff_of
from attribution import _pair, _toy_pair
from timing import free_memory, write_result

LENGTHS = (1024, 4096)


def _peak_gb() -> float:
    """The process's peak resident memory so far, GB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**30 if sys.platform == "darwin" else r / 2**20


def measure(model, old, new, good, bad, *, steps: int, sample: int, seed: int = 0) -> dict:
    first = first_diff_of(old, new)
    stages, t = {}, time.perf_counter()

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        stages[name] = {"seconds": round(now - t, 3), "peak_gb": round(_peak_gb(), 3)}
        t = now

    co, cn = _prefill(model, old, new, first)
    mark("prefill")
    d = decision(model, co, cn, old[-1], good, bad, first)
    mark("decision")
    scores = attribute(model, d, steps=steps)
    mark("attribution")
    idx = EdgeIndex(d.n_layers, d.n_cells, d.n_heads)
    est = scores["ig"].flat()
    top = torch.argsort(-est.abs(), stable=True)[: sample // 2]
    g = torch.Generator().manual_seed(seed)
    rest = torch.randperm(idx.n, generator=g)
    rest = rest[~torch.isin(rest, top)][: sample - len(top)]
    edges = torch.cat([top, rest]).tolist()
    exact = exact_edges(model, d, edges)
    mark("exact")
    attribute_kv(model, co, cn, old[-1], good, bad)
    mark("node_kv")
    s = {k: v["seconds"] for k, v in stages.items()}
    per_edge = s["exact"] / max(1, len(edges))
    agree = {m: agreement(scores[m].flat()[edges], exact) for m in scores}
    return {"tokens": len(old), "first_diff": first, "cells": d.n_cells, "edges": idx.n, "steps": steps,
            "stages": stages, "exact_edges": len(edges), "exact_s_per_edge": per_edge,
            "exact_all_edges_s_extrapolated": per_edge * idx.n,
            "graph_over_node_attribution": s["attribution"] / s["node_kv"],
            "spearman": {m: a["spearman"] for m, a in agree.items()},
            "top8_overlap": {m: a["top8_overlap"] for m, a in agree.items()},
            "spearman_random_half_ig": agreement(est[edges[len(top):]], exact[len(top):])["spearman"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny random llama at 64 / 128 tokens")
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="prompt lengths (default 1024 4096)")
    p.add_argument("--sample", type=int, default=64, help="edges patched exactly per length (default 64)")
    p.add_argument("--steps", type=int, default=8, help="IG steps (default 8)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    model = nk.tiny("llama") if args.toy else nk.load("smollm2-135m")
    lengths = args.lengths or ((64, 128) if args.toy else LENGTHS)
    rows = []
    for n in lengths:
        pair = _toy_pair(n) if args.toy else _pair(model, n)
        rows.append(measure(model, *pair, steps=args.steps, sample=args.sample))
        free_memory(model.device)
    result = {"device": model.device.type, "threads": torch.get_num_threads(), "model": model.name,
              "dtype": str(model.dtype), "rows": rows}
    print(f"{model.name}, {torch.get_num_threads()} threads: the notes graph of one pair (seconds; peak RSS GB)")
    print(f"{'tokens':>7s} {'edges':>9s} {'prefill':>8s} {'attrib':>8s} {'exact/edge':>11s} {'exact all (extrap.)':>20s} "
          f"{'graph/node':>11s} {'rho ig':>7s} {'rho fixed':>9s} {'rho plain':>9s} {'peak GB':>8s}")
    for r in rows:
        st = r["stages"]
        print(f"{r['tokens']:7d} {r['edges']:9d} {st['prefill']['seconds']:8.2f} {st['attribution']['seconds']:8.2f} "
              f"{r['exact_s_per_edge']:11.4f} {r['exact_all_edges_s_extrapolated']:20.0f} "
              f"{r['graph_over_node_attribution']:10.1f}x {r['spearman']['ig']:7.3f} {r['spearman']['fixed']:9.3f} "
              f"{r['spearman']['plain']:9.3f} {max(s['peak_gb'] for s in st.values()):8.2f}")
    write_result(args.out, f"circuit_graph-{'toy-cpu' if args.toy else model.device.type}", result)
    return result


if __name__ == "__main__":
    main()
