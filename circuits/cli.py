"""Deprecated: the command line moved to :mod:`notekv_cli`; this name goes in the next release."""

import sys
import warnings

from notekv_cli import main

warnings.warn("circuits.cli is deprecated; use notekv_cli.main (python -m notekv_cli)", DeprecationWarning,
              stacklevel=2)

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
