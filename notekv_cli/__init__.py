"""The ``notekv`` command line: the top floor, above ``notekv``, ``circuits`` and ``evals``.

:mod:`.app` builds the parser and runs a command; :mod:`.args` holds the argument types
shared by every command; each other module registers the commands of one concern.
"""

from .app import main

__all__ = ["main"]
