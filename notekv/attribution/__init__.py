"""Attribution patching: gradient estimates of every patching cell at once, through the
same plan as exact patching (:class:`~notekv.Tap` sites), and the exact checks they need.

* :func:`attribute_kv` — every (layer, KV head, slot) of a cache patch, from one decode
  step and one backward pass, with the AtP* key fix;
* :func:`attribute_acts` — every (layer, position[, head]) of activation sites, optionally
  with GradDrop, returned per site as the result exact patching gives (a Sweep, or a
  layer x head HeadSweep for head sites);
* :func:`exact_kv` and :func:`agreement` — exact patching of chosen cells and how well an
  estimate ranks them (Spearman, top-k overlap, recall within the estimate's top 4k).
"""

from .acts import ActAttribution, attribute_acts
from .agreement import agreement, spearman, summarize
from .exact import exact_kv
from .kv import KVAttribution, attribute_kv, stack_rows
from .text import kv_attribution

__all__ = ["ActAttribution", "KVAttribution", "agreement", "attribute_acts", "attribute_kv", "exact_kv",
           "kv_attribution", "spearman", "stack_rows", "summarize"]
