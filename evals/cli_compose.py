"""``notekv eval-compose``: fidelity of spliced skills vs the noise floor -> compose.json + index.html.

Registered on ``notekv``'s command line (``circuits/cli.py``) by :func:`add_parser`.
"""

from __future__ import annotations


def _cmd_eval_compose(args) -> int:
    from . import compose as ce

    result = ce.evaluate(args.model, n_pairs=args.pairs, bf16=not args.no_bf16, agent_turns=args.turns)
    out = ce.save(result, args.out)
    arms = result["fidelity"]["arms"]
    print(f"{result['fidelity']['n_pairs']} prefix x skill pairs, {result['runtime_s']:.0f} s; default mode "
          f"{result['default_mode']}, best by mean KL: {result['best_mode_by_kl_mean']}")
    print(f"{'arm':18s} {'n':>3s} {'KL mean':>9s} {'95% CI':>19s} {'KL last':>8s} {'top1':>5s} {'margin err':>10s} {'agree':>5s}")
    for arm, r in arms.items():
        lo, hi = r["kl_mean"]["ci"]
        print(f"{arm:18s} {r['kl_mean']['n']:3d} {r['kl_mean']['mean']:9.4f} [{lo:.4f}, {hi:.4f}] "
              f"{r['kl_last']['mean']:8.4f} {r['top1']['mean']:5.2f} {r['margin_err']['mean']:10.3f} "
              f"{r['decision_agree_rate']['rate']:5.2f}")
    ag = result["agent"]
    print(f"agent: {ag['n_turns']} turns, agreement {ag['agreement']['rate']:.2f} {ag['agreement']['ci']}, "
          f"time full/composed {ag['time_ratio_full_over_composed']:.2f}x")
    ks = result["keystone"]
    print(f"keystone ({ks['n_cases']} cases, {ks['skipped']} skipped): agreement with the full recompute of the new value")
    for arm, r in ks["arms"].items():
        print(f"  {arm:28s} {r['agreement']['k']:2d}/{r['agreement']['n']:2d}  KL {r['kl']['mean']:.4f} {r['kl']['ci']}  "
              f"margin err {r['margin_err']['mean']:.3f}")
    print(f"wrote {out / 'compose.json'} and {out / 'index.html'}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``eval-compose`` on an argparse subparsers object."""
    from circuits.cli_args import add_model_and_out, count

    p = subparsers.add_parser("eval-compose", help="fidelity of spliced skills vs the noise floor (compose.json + index.html)",
                              epilog="example: notekv eval-compose --model smollm2-135m --out reports/compose")
    add_model_and_out(p)
    p.add_argument("--pairs", type=count(1), default=None, help="prefix x skill pairs (default all 20)")
    p.add_argument("--turns", type=count(1), default=None, help="agent turns (default all 12)")
    p.add_argument("--no-bf16", action="store_true", help="skip the fp32-vs-bf16 noise floor")
    p.set_defaults(fn=_cmd_eval_compose)
