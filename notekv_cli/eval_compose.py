"""``notekv eval-compose``: fidelity of spliced skills vs the noise floor -> compose.json + index.html.

Registered on ``notekv``'s command line (:mod:`notekv_cli.app`) by :func:`add_parser`.
"""

from __future__ import annotations

import argparse

from .args import add_model_and_out, count, load_model, prepare_out

EPILOG = """examples:
  notekv eval-compose --model smollm2-135m --out reports/compose
  notekv eval-compose --model smollm2-135m --scenario access --out reports/compose-access
  notekv eval-compose --scenario my_gate.toml --out reports/mine --pairs 8 --turns 4 --keystone 2 --no-bf16

With --scenario (a built-in name or a scenario .toml, the format of notekv report; kind gate or
polarity), the skill is the scenario's policy, each prefix a record holding the field with one
of its positive and negative values in turn ("Record #<id>. Name: <name>. <field>: <value>."),
the suffix the scenario's few-shot examples and its query with the same value, and the decision
is between its two answer words. The agent asks one query per turn; the keystone compiles the
policy, the examples and the query up to the field value as one skill and edits the field with
the scenario's value_pairs (else three drawn pairs).
"""


def _scenario(text: str) -> str:
    """An argparse type: a scenario eval-compose can build its suite from."""
    from circuits import scenarios
    from evals import compose as ce

    try:
        ce.scenario_suite(text, n_prefixes=1, n_keystone=1, n_turns=1)
    except scenarios.ScenarioError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _cmd_eval_compose(args) -> int:
    from evals import compose as ce

    suite = None
    if args.scenario is not None:
        suite = ce.scenario_suite(args.scenario, n_prefixes=args.pairs or 20)
    prepare_out(args.out, ("compose.json", "index.html"))
    model = load_model(args)
    ce.answer_ids(model, (suite or ce.DEFAULT_SUITE).answers)  # before the floor model loads and any forward
    floor = None if args.no_bf16 else load_model(args, dtype=ce.floor_dtype(model.dtype))
    result = ce.evaluate(args.model, n_pairs=args.pairs, dtype_floor=not args.no_bf16, agent_turns=args.turns,
                         keystone_prefixes=args.keystone, suite=suite, model=model, floor_model=floor)
    out = ce.save(result, args.out)
    arms = result["fidelity"]["arms"]
    if suite is not None:
        print(f"scenario {suite.name} ({args.scenario}): field {suite.keystone_field}, answers "
              f"{suite.answers[0]!r} / {suite.answers[1]!r}")
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
    p = subparsers.add_parser("eval-compose", help="fidelity of spliced skills vs the noise floor (compose.json + index.html)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_out(p)
    p.add_argument("--scenario", type=_scenario, default=None,
                   help="compose a scenario's policy, records and query instead of the built-in refund, shipping, "
                        "access and escalation skills: a built-in name or a scenario .toml (see below)")
    p.add_argument("--pairs", type=count(1), default=None, help="prefix x skill pairs (default all 20)")
    p.add_argument("--turns", type=count(1), default=None, help="agent turns (default all 12)")
    p.add_argument("--keystone", type=count(1), default=None, help="keystone prefixes (default all 5)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip the noise floor across dtypes (the full recompute in bf16, or in fp32 when --dtype is "
                        "bfloat16 or float16)")
    p.set_defaults(fn=_cmd_eval_compose)
