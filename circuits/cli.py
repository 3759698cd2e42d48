"""The ``notekv`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from evals.cli_edits import add_parser as add_edits_parser
from evals.cli_compose import add_parser as add_compose_parser


def _cmd_models(args) -> int:
    from notekv.model.load import bundled_models, cache_dir

    print(f"{'name':14s} {'installed':9s} description")
    for m in bundled_models():
        print(f"{m['name']:14s} {'yes' if m['installed'] else 'no':9s} {m['description']}")
    print(f"\ncache: {cache_dir()}")
    return 0


def _cmd_canaries(args) -> int:
    import notekv as nk
    from notekv.hooks.canaries import run_canaries

    model = nk.load(args.model)
    print(json.dumps(run_canaries(model), indent=1))
    return 0


def _cmd_demo(args) -> int:
    import notekv as nk
    from notekv.hooks.canaries import run_canaries

    from .demo import format_table, run_demo

    model = nk.load(args.model)
    print(repr(model))
    print("canaries:", json.dumps(run_canaries(model)))
    res = run_demo(model, args.old, args.new)
    print(format_table(model, res, args.old, args.new))
    return 0


def _cmd_report(args) -> int:
    import notekv as nk

    from .report import CircuitReport

    model = nk.load(args.model)
    rep = CircuitReport.build(model, args.scenario, pairs=args.pairs, seed=args.seed, act_pairs=args.act_pairs,
                              heatmap_pairs=args.heatmap_pairs)
    out = rep.save(args.out)
    d = rep.data
    print(d["verdict"])
    if "recovery" in d:
        r = d["recovery"]
        for name in ("field_only", "after_field", "downstream"):
            s = r[name]
            print(f"  {name:12s} recovery {s['mean']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] n={s['n']}")
        print(f"  top-8 {r['top_k_at']['mean']:+.3f} vs random-8 {r['random_k_at']['mean']:+.3f} "
              f"(evaluation pairs, n={r['top_k_at']['n']})")
    print(f"wrote {out / 'report.json'} and {out / 'index.html'} in {d['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notekv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_edits_parser(sub)
    add_compose_parser(sub)
    sub.add_parser("models", help="list the bundled models and whether they are installed").set_defaults(fn=_cmd_models)
    p = sub.add_parser("canaries", help="run the load canaries on a model")
    p.add_argument("--model", default="smollm2-135m")
    p.set_defaults(fn=_cmd_canaries)
    p = sub.add_parser("demo", help="load a bundled model, run hooked forwards and print a small table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--old", default="delivered")
    p.add_argument("--new", default="cancelled")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("report", help="locate the notes: the KV-patching battery and the read/write circuit")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory or .gguf path")
    p.add_argument("--scenario", default="refund", help="built-in scenario name or a .toml file")
    p.add_argument("--out", default="reports/refund")
    p.add_argument("--pairs", type=int, default=64, help="candidate pairs to screen (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--act-pairs", type=int, default=8, help="evaluation pairs for activation patching")
    p.add_argument("--heatmap-pairs", type=int, default=3, help="pairs for the layer x position heatmap")
    p.set_defaults(fn=_cmd_report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
