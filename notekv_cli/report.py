"""``notekv report``: the circuit report of a scenario -> report.json + index.html."""

from __future__ import annotations

import sys

from .args import add_model, claim_out, count, default_out, load_model, out_dir, scenario

FILES = ("report.json", "index.html")
INTERRUPTED = 130  # the shell's exit status for Ctrl-C (128 + SIGINT)


def _cmd_report(args) -> int:
    from circuits.report import CircuitReport

    out = args.out if args.out is not None else default_out(args.model, args.scenario)
    claim_out(out, FILES, force=args.force)
    try:
        model = load_model(args)
        rep = CircuitReport.build(model, args.scenario, pairs=args.pairs, seed=args.seed, act_pairs=args.act_pairs,
                                  heatmap_pairs=args.heatmap_pairs, screen=args.screen,
                                  context_tokens=args.context_tokens, ranking=args.ranking, out=out)
        out = rep.save(out)
    except KeyboardInterrupt:
        print(f"notekv report: interrupted; {_kept(out)}", file=sys.stderr)
        return INTERRUPTED
    d = rep.data
    print(d["verdict"])
    if "recovery" in d:
        r = d["recovery"]
        for name in ("field_only", "after_field", "downstream"):
            s = r[name]
            print(f"  {name:12s} recovery {s['mean']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] n={s['n']}")
        if "top_k_at" in r:
            print(f"  top-8 {r['top_k_at']['mean']:+.3f} vs random-8 {r['random_k_at']['mean']:+.3f} "
                  f"(evaluation pairs, n={r['top_k_at']['n']}; 8 is {_share(r, 8)} of the slots here)")
            t, x = r["top_fraction_at"], r["random_fraction_at"]
            print(f"  top {t['fraction']:.0%} {t['mean']:+.3f} vs random {x['fraction']:.0%} {x['mean']:+.3f} "
                  f"(the same fraction of the slots from the field on, n={t['n']})")
        for part, why in (d.get("too_few_pairs") or {}).items():
            print(f"  {part.replace('_', ' ')}: not run, {why}")
        at = d.get("attribution", {})
        if "spearman" in at.get("agreement", {}).get("cells", {}):
            rho = at["agreement"]["cells"]["spearman"]
            print(f"  notes ranked by {at['method']} patching; KV attribution vs exact: Spearman {rho['mean']:.3f} "
                  f"[{rho['ci'][0]:.3f}, {rho['ci'][1]:.3f}] n={rho['n']} pairs")
        c = d.get("circuit")
        if c:
            g, rho = c["faithfulness"]["full_graph"], c["agreement"][c["method"]]["spearman"]
            shows = {True: "shows", False: "does not show", None: "too few pairs to tell"}[c["dispersion"]["shows"]]
            print(f"  notes graph: every edge carries {g['mean']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] of the "
                  f"swing (n={g['n']}); {c['method']} vs exact path patching: Spearman {rho['mean']:.3f} "
                  f"[{rho['ci'][0]:.3f}, {rho['ci'][1]:.3f}] n={rho['n']} pairs; {shows} distributed write, "
                  "concentrated read")
    print(f"wrote {out / 'report.json'} and {out / 'index.html'} in {d['seconds']:.0f} s")
    return 0


def _share(r: dict, k: int) -> str:
    fk = {x["k"]: x for x in r.get("k_as_fraction", [])}
    return f"{fk[k]['mean']:.0%}" if k in fk else "?"


def _kept(out) -> str:
    """What an interrupted run left in ``out``: the finished stages, or nothing."""
    import json

    try:
        d = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        d = {}
    if d.get("complete", True):
        return "no stage had finished, nothing new written"
    done = d.get("stages_done", [])
    return f"{len(done)} finished stages ({', '.join(done)}) are in {out / 'report.json'} (\"complete\": false)"


def add_parser(sub) -> None:
    """Register ``report`` on an argparse subparsers object."""
    p = sub.add_parser("report", help="locate the notes: the KV-patching battery and the read/write circuit",
                       epilog="example: notekv report --model smollm2-135m --scenario refund --out reports/refund")
    add_model(p)
    p.add_argument("--scenario", default="refund", type=scenario,
                   help="built-in scenario name or a .toml file (default refund)")
    p.add_argument("--out", default=None, type=out_dir,
                   help="output directory (default reports/<model>-<scenario>); a directory that holds anything but "
                        "a notekv report is refused unless --force")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out directory that holds no notekv report (report.json and "
                        "index.html are replaced; other files are left as they are)")
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
