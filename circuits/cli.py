"""The ``notekv`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from evals.cli_compose import add_parser as add_compose_parser
from evals.cli_edits import add_parser as add_edits_parser

from .cli_args import add_model, count, load_model, out_dir, scenario


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``notekv report: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_models(args) -> int:
    from notekv.model.load import bundled_models, cache_dir

    print(f"{'name':14s} {'installed':9s} description")
    for m in bundled_models():
        print(f"{m['name']:14s} {'yes' if m['installed'] else 'no':9s} {m['description']}")
    print(f"\ncache: {cache_dir()}")
    return 0


def _cmd_scenarios(args) -> int:
    from . import scenarios

    print(f"{'name':16s} {'kind':9s} {'field':15s} {'edit':4s} description")
    for name in scenarios.builtin():
        sc = scenarios.get(name)
        print(f"{name:16s} {sc.kind:9s} {sc.field:15s} {'yes' if sc.edit else 'no':4s} {sc.description}")
    print(f"\nfiles: {scenarios.DATA}; pass your own with --scenario path/to/file.toml (format: README, Circuit reports)")
    return 0


def _cmd_canaries(args) -> int:
    from notekv.hooks.canaries import run_canaries

    model = load_model(args)
    print(json.dumps(run_canaries(model), indent=1))
    return 0


def _cmd_demo(args) -> int:
    from notekv.hooks.canaries import run_canaries

    from .demo import format_table, run_demo

    model = load_model(args)
    print(repr(model))
    print("canaries:", json.dumps(run_canaries(model)))
    res = run_demo(model, args.old, args.new)
    print(format_table(model, res, args.old, args.new))
    return 0


def _cmd_report(args) -> int:
    from .report import CircuitReport

    model = load_model(args)
    rep = CircuitReport.build(model, args.scenario, pairs=args.pairs, seed=args.seed, act_pairs=args.act_pairs,
                              heatmap_pairs=args.heatmap_pairs, screen=args.screen,
                              context_tokens=args.context_tokens, ranking=args.ranking)
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
        at = d.get("attribution", {})
        if "agreement" in at:
            rho = at["agreement"]["cells"]["spearman"]
            print(f"  notes ranked by {at['method']} patching; KV attribution vs exact: Spearman {rho['mean']:.3f} "
                  f"[{rho['ci'][0]:.3f}, {rho['ci'][1]:.3f}] n={rho['n']} pairs")
    print(f"wrote {out / 'report.json'} and {out / 'index.html'} in {d['seconds']:.0f} s")
    return 0


EXAMPLES = """examples:
  notekv models
  notekv scenarios
  notekv report --model smollm2-135m --scenario refund --out reports/refund
  notekv report --model gemma3-270m --scenario my_gate.toml --out reports/mine --pairs 32
  notekv report --model smollm2-135m --context-tokens 4096 --pairs 8 --out reports/long
  notekv eval-edits --model smollm2-135m --scenario refund --out reports/edits
  notekv eval-compose --model smollm2-135m --out reports/compose
  notekv eval-compose --model smollm2-135m --scenario my_gate.toml --out reports/compose-mine
  notekv demo --old delivered --new cancelled
"""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one line and return 2."""
    from notekv.errors import NotekvError

    parser = _Parser(prog="notekv", description=__doc__, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count(1), default=None,
                        help="CPU threads for torch (default: $OMP_NUM_THREADS, else torch's own choice)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_edits_parser(sub)
    add_compose_parser(sub)
    sub.add_parser("models", help="list the bundled models and whether they are installed").set_defaults(fn=_cmd_models)
    sub.add_parser("scenarios", help="list the built-in scenarios (gates, readback, polarity)").set_defaults(
        fn=_cmd_scenarios)
    p = sub.add_parser("canaries", help="run the load canaries on a model")
    add_model(p)
    p.set_defaults(fn=_cmd_canaries)
    p = sub.add_parser("demo", help="load a bundled model, run hooked forwards and print a small table")
    add_model(p)
    p.add_argument("--old", default="delivered", help="the field's OLD value (default delivered)")
    p.add_argument("--new", default="cancelled", help="the field's NEW value, same token count (default cancelled)")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("report", help="locate the notes: the KV-patching battery and the read/write circuit",
                       epilog="example: notekv report --model smollm2-135m --scenario refund --out reports/refund")
    add_model(p)
    p.add_argument("--scenario", default="refund", type=scenario,
                   help="built-in scenario name or a .toml file (default refund)")
    p.add_argument("--out", default="reports/refund", type=out_dir, help="output directory (default reports/refund)")
    p.add_argument("--pairs", type=count(1), default=64, help="candidate pairs to screen (default 64)")
    p.add_argument("--seed", type=count(0), default=0, help="seed of pair sampling and the split (default 0)")
    p.add_argument("--act-pairs", type=count(1), default=8, help="evaluation pairs for activation patching (default 8)")
    p.add_argument("--heatmap-pairs", type=count(1), default=3, help="pairs for the layer x position heatmap (default 3)")
    p.add_argument("--screen", choices=("flip", "swing"), default="flip",
                   help="usable pairs: 'flip' (the decision flips with the field; default) or 'swing' (the field "
                        "moves the decision by >= 0.5 logits the rule's way, flipped or not)")
    p.add_argument("--context-tokens", type=count(1), default=None, metavar="N",
                   help="lengthen every prompt with few-shot examples to about N tokens (at most N, and at most "
                        "the model's context); default: the scenario's own examples")
    p.add_argument("--ranking", choices=("auto", "exact", "attribution"), default="auto",
                   help="what ranks note positions and read heads: 'exact' patching of every downstream slot, "
                        "'attribution' (KV attribution, the ranked slots then patched exactly) or 'auto' "
                        "(attribution above 300 downstream slots; default)")
    p.set_defaults(fn=_cmd_report)
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.fn(args)
    except NotekvError as err:
        print(f"notekv {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
