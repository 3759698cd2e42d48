"""``notekv models``, ``notekv scenarios`` and ``notekv support``: what is bundled, built in
and supported by each executor."""

from __future__ import annotations


def _cmd_models(args) -> int:
    from notekv.model.load import bundled_models, cache_dir

    print(f"{'name':14s} {'installed':9s} description")
    for m in bundled_models():
        print(f"{m['name']:14s} {'yes' if m['installed'] else 'no':9s} {m['description']}")
    print(f"\ncache: {cache_dir()}")
    return 0


def _cmd_scenarios(args) -> int:
    from circuits import scenarios

    print(f"{'name':16s} {'kind':9s} {'field':15s} {'edit':4s} description")
    for name in scenarios.builtin():
        sc = scenarios.get(name)
        print(f"{name:16s} {sc.kind:9s} {sc.field:15s} {'yes' if sc.edit else 'no':4s} {sc.description}")
    print(f"\nfiles: {scenarios.DATA}; pass your own with --scenario path/to/file.toml (format: README, Circuit reports)")
    return 0


def _cmd_support(args) -> int:
    from notekv.hooks.sitemap import format_support_table

    print(format_support_table().rstrip())
    return 0


def add_parsers(sub) -> None:
    """Register ``models``, ``scenarios`` and ``support`` on an argparse subparsers object."""
    sub.add_parser("models", help="list the bundled models and whether they are installed").set_defaults(fn=_cmd_models)
    sub.add_parser("scenarios", help="list the built-in scenarios (gates, readback, polarity)").set_defaults(
        fn=_cmd_scenarios)
    sub.add_parser("support", help="print which sites and interventions each executor (native, TransformerLens, "
                   "nnsight) supports, as a Markdown table generated from the site map").set_defaults(fn=_cmd_support)
