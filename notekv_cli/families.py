"""``notekv families`` and ``notekv check``: the capability matrix, measured on the families'
tiny models or on the user's own model."""

from __future__ import annotations

import json

from .args import model_name


def _cmd_families(args) -> int:
    from notekv.capabilities import family_matrix, format_matrix

    rows = family_matrix(args.only or None, seed=args.seed, progress=True)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
    else:
        print(format_matrix(rows))
    return 1 if any(r.failed for r in rows) else 0


def _cmd_check(args) -> int:
    import notekv as nk
    from notekv.capabilities import check_model, format_matrix
    from notekv.hooks.canaries import run_canaries

    model = nk.load(args.model)
    canaries = run_canaries(model)
    row = check_model(model, seed=args.seed, progress=True)
    if args.json:
        print(json.dumps({"model": model.name, "canaries": canaries, **row.to_json()}, indent=1))
    else:
        print(f"{model!r}")
        print("canaries: " + ", ".join(f"{k} {v:.3g}" for k, v in canaries.items()))
        print(format_matrix([row]))
        print(f"(seed {row.seed}; yes = matched a reference built without notekv; no = refused, reason below)")
    return 1 if row.failed else 0


def add_parsers(sub) -> None:
    """Register ``families`` and ``check`` on an argparse subparsers object."""
    from notekv.model.tiny import TINY_CONFIGS

    p = sub.add_parser("families", help="measure every capability on the tiny model of each supported family and "
                       "print the matrix (yes / refused with the reason)")
    p.add_argument("--only", nargs="+", choices=sorted(TINY_CONFIGS), default=None,
                   metavar="FAMILY", help="only these families (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the prompts and offsets (default: random)")
    p.add_argument("--json", action="store_true", help="print the cells with their measured errors as JSON")
    p.set_defaults(fn=_cmd_families)
    p = sub.add_parser("check", help="run the load canaries and the capability matrix on one model (a bundled "
                       "name or a local HF directory): which operations are exact on it")
    p.add_argument("model", type=model_name, help="a bundled model name (see `notekv models`) or a local HF model directory")
    p.add_argument("--seed", type=int, default=None, help="seed of the prompts and offsets (default: random)")
    p.add_argument("--json", action="store_true", help="print the cells with their measured errors as JSON")
    p.set_defaults(fn=_cmd_check)
