"""``notekv eval-edits``: every edit mode on the edit gates of scenario files -> edits.json + index.html.

Registered on ``notekv``'s command line (:mod:`notekv_cli.app`) by :func:`add_parser`.
"""

from __future__ import annotations

import json
import sys

from .args import add_model_and_out, count, load_model, number, prepare_out


def _cmd_eval_edits(args) -> int:
    from circuits import scenarios
    from evals import edit_cases, edits

    suite = dict(edit_cases.GATES)
    names = list(suite) if args.scenario in ("all", "") else [g.strip() for g in args.scenario.split(",")]
    gates = []
    for g in names:
        if g.endswith(".toml"):
            try:
                sc = scenarios.load(g)
            except scenarios.ScenarioError as err:
                print(f"notekv eval-edits: {err}", file=sys.stderr)
                return 2
            if sc.edit_gate() is None:
                print(f"notekv eval-edits: {g} has no [edit] table (line, cue, requests); see the README's scenario format",
                      file=sys.stderr)
                return 2
            suite[sc.name] = sc.edit_gate()
            g = sc.name
        elif g not in suite:
            print(f"notekv eval-edits: unknown scenario {g!r}; edit gates: {sorted(suite)}, 'all' or a .toml file",
                  file=sys.stderr)
            return 2
        gates.append(g)
    edits.check_gates(gates, suite)
    prepare_out(args.out, ("edits.json", "index.html"))
    model = load_model(args)
    result = edits.evaluate(model, gates, args.cases, k=args.k, min_swing=args.min_swing, seed=args.seed,
                            max_candidates=args.max_candidates, scenario=args.scenario, suite=suite)
    out = edits.save(result, args.out)
    print(f"{result['n_valid']} valid cases ({result['n_screened_out']} screened out) in {result['runtime_s']:.0f} s")
    print(f"{'mode':40s} {'n':>3s} {'P(correct)':>10s} {'95% CI':>13s} {'raw':>5s} {'tokens':>7s}")
    for r in result["modes"] + result["controls"]:
        lo, hi = r["ci"]
        print(f"{r['mode']:40s} {r['n']:3d} {r['p_correct']:10.2f}   [{lo:.2f}, {hi:.2f}] {r['raw_p_correct']:5.2f} "
              f"{r['tokens_recomputed']:7.1f}")
    a = result["auto"]
    if a.get("n"):
        print("auto:", json.dumps({k: a[k] for k in ("chosen", "prefiltered")}),
              "precision/recall (raw):", a["raw"]["precision"]["rate"], a["raw"]["recall"]["rate"])
    print(f"wrote {out / 'edits.json'} and {out / 'index.html'}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``eval-edits`` on an argparse subparsers object."""
    p = subparsers.add_parser("eval-edits", help="evaluate every edit mode on the edit suite (edits.json + index.html)",
                              epilog="example: notekv eval-edits --model smollm2-135m --scenario refund --out reports/edits")
    add_model_and_out(p)
    p.add_argument("--scenario", default="all",
                   help="edit gate(s): 'refund', 'access', a scenario .toml with an [edit] table, a comma list, "
                        "or 'all' (default)")
    p.add_argument("--cases", type=count(1), default=32, help="valid cases, spread over the gates (default 32)")
    p.add_argument("--k", type=count(1), default=4, help="K of selective@K (default 4)")
    p.add_argument("--min-swing", type=number, default=0.25,
                   help="screen: the full recomputes must order the two values by the rule by at least this "
                        "(logits, default 0.25)")
    p.add_argument("--max-candidates", type=count(1), default=None, help="cases tried at most (default 3 x --cases)")
    p.add_argument("--seed", type=count(0), default=0, help="seed of the cases (default 0)")
    p.set_defaults(fn=_cmd_eval_edits)
