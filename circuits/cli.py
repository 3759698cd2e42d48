"""The ``notekv`` command line."""

from __future__ import annotations

import argparse
import json
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notekv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the bundled models and whether they are installed").set_defaults(fn=_cmd_models)
    p = sub.add_parser("canaries", help="run the load canaries on a model")
    p.add_argument("--model", default="smollm2-135m")
    p.set_defaults(fn=_cmd_canaries)
    p = sub.add_parser("demo", help="load a bundled model, run hooked forwards and print a small table")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--old", default="delivered")
    p.add_argument("--new", default="cancelled")
    p.set_defaults(fn=_cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
