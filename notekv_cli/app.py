"""The ``notekv`` command line."""

from __future__ import annotations

import argparse
import sys

from . import demo, eval_compose, eval_edits, families, lists, report
from .args import count


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``notekv report: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EXAMPLES = """examples:
  notekv models
  notekv scenarios
  notekv families
  notekv check smollm2-135m
  notekv check path/to/hf-model-dir
  notekv report --model smollm2-135m --scenario refund --out reports/refund
  notekv report --model gemma3-270m --scenario my_gate.toml --out reports/mine --pairs 32
  notekv report --model smollm2-135m --context-tokens 4096 --pairs 8 --out reports/long
  notekv eval-edits --model smollm2-135m --scenario refund --out reports/edits
  notekv eval-compose --model smollm2-135m --out reports/compose
  notekv eval-compose --model smollm2-135m --scenario my_gate.toml --out reports/compose-mine
  notekv demo --old delivered --new cancelled
"""


def version() -> str:
    """The installed notekv's version (the package's own ``__version__`` when run from a
    source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("notekv")
    except PackageNotFoundError:
        from notekv import __version__

        return __version__


def parser() -> argparse.ArgumentParser:
    """The ``notekv`` parser with every command registered."""
    p = _Parser(prog="notekv", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"notekv {version()}",
                   help="print notekv's version and exit")
    p.add_argument("--threads", type=count(1), default=None,
                   help="CPU threads for torch (default: $OMP_NUM_THREADS, else torch's own choice)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    eval_edits.add_parser(sub)
    eval_compose.add_parser(sub)
    lists.add_parsers(sub)
    families.add_parsers(sub)
    demo.add_parsers(sub)
    report.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one line and return 2."""
    from notekv.errors import NotekvError

    args = parser().parse_args(argv)
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
