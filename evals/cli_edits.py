"""Deprecated: ``notekv eval-edits`` moved to :mod:`notekv_cli.eval_edits`; this name goes in the
next release."""

import warnings

from notekv_cli.eval_edits import _cmd_eval_edits, add_parser

warnings.warn("evals.cli_edits is deprecated; use notekv_cli.eval_edits", DeprecationWarning, stacklevel=2)

__all__ = ["add_parser"]
