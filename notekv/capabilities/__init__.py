"""What notekv can do on a model, measured: the capability matrix.

>>> from notekv.capabilities import check_model, family_matrix, format_matrix
>>> row = check_model(nk.tiny("gemma3_text"))      # one model, every check
>>> row.cells["shift"]                              # Cell(status='yes', error=3e-07, ...)
>>> print(format_matrix(family_matrix()))           # every family (`notekv families`)

Each check (:data:`CHECKS`) compares notekv against a reference built without it: plain
transformers forwards with plain PyTorch hooks, hand-built caches and explicit positions.
"""

from .checks import CHECKS, LINEAR_TOL, PARITY_TOL, SHIFT_RANGE, SHIFT_TOL, CheckFailed, Probe, rel_err, rel_norm
from .matrix import CapabilityRow, Cell, check_model, family_matrix, format_matrix, run_check

__all__ = ["CHECKS", "CapabilityRow", "Cell", "CheckFailed", "LINEAR_TOL", "PARITY_TOL", "Probe", "SHIFT_RANGE", "SHIFT_TOL",
           "check_model", "family_matrix", "format_matrix", "rel_err", "rel_norm", "run_check"]
