"""``python -m notekv_cli``: the ``notekv`` command line."""

import sys

from .app import main

sys.exit(main())
