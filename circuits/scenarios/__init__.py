"""Gated-decision scenarios as data, and the aligned OLD/NEW pairs they generate.

A scenario is a TOML file: a policy line, a mutable field and its values (the rule holds
for ``positive_values``), few-shot examples, a query and two answer words. Built-in ones
live in ``circuits/scenarios/data``; a user passes the path of their own file in the same
format. Kinds: ``gate`` (the answer depends on the field through the rule), ``readback``
(the answer is the field value) and ``polarity`` (the field is fixed, the rule's trigger
word flips). Every pair has OLD and NEW prompts of equal token length that differ only
inside one span; anything else is refused with an error naming the key or value.

Modules: :mod:`.scenario` (the :class:`Scenario` type), :mod:`.pair` (:class:`Pair` and the
alignment check), :mod:`.schema` (the file format and its validation), :mod:`.registry`
(built-in names and files: :func:`get`, :func:`load`, :func:`builtin`).
"""

from .errors import ScenarioError
from .pair import REGIONS, Pair
from .registry import DATA, builtin, get, load
from .scenario import Scenario
from .schema import EDIT_OPTIONAL, EDIT_REQUIRED, KINDS, OPTIONAL, REQUIRED

__all__ = ["DATA", "EDIT_OPTIONAL", "EDIT_REQUIRED", "KINDS", "OPTIONAL", "REGIONS", "REQUIRED", "Pair", "Scenario",
           "ScenarioError", "builtin", "get", "load"]
