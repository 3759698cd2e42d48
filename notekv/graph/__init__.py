"""The notes circuit as a graph: field -> note cells (layer, slot) -> read heads (layer, head)
at the decision -> logit difference, with edge scores by attribution (EAP, EAP with the key
fix, EAP-IG), exact direct path patching of sampled edges, faithfulness curves of ranked
circuits against random ones, and the write-dispersion / read-concentration verdict.

Modules: :mod:`~notekv.graph.readout` (the decision step with frozen heads),
:mod:`~notekv.graph.edges` (edges, attribution, exact values), :mod:`~notekv.graph.faithfulness`,
:mod:`~notekv.graph.dispersion`, :mod:`~notekv.graph.figure`, :mod:`~notekv.graph.api`
(:func:`circuit`, :class:`CircuitGraph`).
"""

from .api import CircuitGraph, PairGraph, circuit, default_keys, split_pairs
from .edges import METHODS, EdgeIndex, EdgeScores, attribute, evaluate, exact_edges
from .readout import Decision, decision, head_z, readout

load = CircuitGraph.load

__all__ = ["CircuitGraph", "Decision", "EdgeIndex", "EdgeScores", "METHODS", "PairGraph", "attribute", "circuit",
           "decision", "default_keys", "evaluate", "exact_edges", "head_z", "load", "readout", "split_pairs"]
