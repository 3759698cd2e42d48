"""Editing a prefilled document: fields, modes, decisions, cost and fidelity.

>>> import notekv as nk
>>> ctx = nk.EditableContext(model, template, fields={"order_status": "delivered"},
...                          cue="Refund request:", choices=["granted", "denied"]).prefill()
>>> st = ctx.edit("order_status", "cancelled", mode="field+erratum")
>>> st.decide().choice, st.cost.to_json(), st.fidelity()

See :mod:`notekv.edit.modes` for what each mode recomputes.
"""

from .context import DEFAULT_ERRATUM, DEFAULT_HOIST, EditableContext, EditState
from .document import EditError, Field, Layout
from .modes import FLAVOURS, MODES, RANKS, AutoReport
from .score import Decision, EditCost

__all__ = [
    "AutoReport", "DEFAULT_ERRATUM", "DEFAULT_HOIST", "Decision", "EditCost", "EditError", "EditState",
    "EditableContext", "FLAVOURS", "Field", "Layout", "MODES", "RANKS",
]
