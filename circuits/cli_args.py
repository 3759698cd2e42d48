"""Deprecated: the command line's argument types moved to :mod:`notekv_cli.args`; this name goes
in the next release."""

import warnings

from notekv_cli.args import (DTYPES, add_model, add_model_and_out, count, device_name, dtype_name, load_model,
                             model_name, number, out_dir, scenario)

warnings.warn("circuits.cli_args is deprecated; use notekv_cli.args", DeprecationWarning, stacklevel=2)

__all__ = ["DTYPES", "add_model", "add_model_and_out", "count", "device_name", "dtype_name", "load_model",
           "model_name", "number", "out_dir", "scenario"]
