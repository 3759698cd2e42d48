"""Deprecated: ``notekv eval-compose`` moved to :mod:`notekv_cli.eval_compose`; this name goes in
the next release."""

import warnings

from notekv_cli.eval_compose import EPILOG, _cmd_eval_compose, _scenario, add_parser

warnings.warn("evals.cli_compose is deprecated; use notekv_cli.eval_compose", DeprecationWarning, stacklevel=2)

__all__ = ["EPILOG", "add_parser"]
