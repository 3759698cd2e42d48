"""``notekv canaries`` and ``notekv demo``: a first look at one loaded model."""

from __future__ import annotations

import json

from .args import add_model, load_model


def _cmd_canaries(args) -> int:
    from notekv.hooks.canaries import run_canaries

    model = load_model(args)
    print(json.dumps(run_canaries(model), indent=1))
    return 0


def _cmd_demo(args) -> int:
    from circuits import scenarios
    from circuits.demo import SCENARIO, format_table, run_demo
    from notekv.hooks.canaries import run_canaries

    sc = scenarios.get(SCENARIO)
    sc.check_pair(args.old, args.new)  # values of the demo's scenario, before the model loads
    model = load_model(args)
    sc.check_answers(model)
    sc.pair(model, 0, old=args.old, new=args.new)  # the pair aligns on this tokenizer, before any forward
    print(repr(model))
    print("canaries:", json.dumps(run_canaries(model)))
    res = run_demo(model, args.old, args.new)
    print(format_table(model, res, args.old, args.new))
    return 0


def add_parsers(sub) -> None:
    """Register ``canaries`` and ``demo`` on an argparse subparsers object."""
    p = sub.add_parser("canaries", help="run the load canaries on a model")
    add_model(p)
    p.set_defaults(fn=_cmd_canaries)
    p = sub.add_parser("demo", help="load a bundled model, run hooked forwards and print a small table")
    add_model(p)
    p.add_argument("--old", default="delivered",
                   help="the field's OLD value, a value of the refund scenario (default delivered)")
    p.add_argument("--new", default="cancelled",
                   help="the field's NEW value, on the rule's other side, same token count (default cancelled)")
    p.set_defaults(fn=_cmd_demo)
