"""Optional backends: the same notekv site strings and intervention objects, run through
other interpretability libraries, for cross-checking results and for users of those tools.

* :class:`notekv.backends.tl.TLBackend` -- a TransformerLens 4.3 ``TransformerBridge``
  (``pip install notekv[tl]``);
* :class:`notekv.backends.nnsight.NNsightBackend` -- an nnsight 0.8.1 ``TransformersModel``
  (``pip install notekv[nnsight]``).

Both take a loaded :class:`~notekv.HookedModel` and offer ``run(inputs, collect=[...],
interventions=[...], grad=False) -> Run`` with the native shapes. Each module registers its
routes in the site map (:func:`notekv.hooks.sitemap.register_executor`) on import; this
package imports both modules (never their libraries, which load only when a backend is
built). What each executor supports is generated from the map:
:func:`notekv.hooks.sitemap.format_support_table`.
"""

from __future__ import annotations

from . import tl as _tl  # noqa: F401,I001  (registers the "tl" routes; first: the table's column order)
from . import nnsight as _nnsight  # noqa: F401  (registers the "nnsight" routes)


def support_table(spec=None) -> str:
    """The Markdown support table of every executor (:func:`notekv.hooks.sitemap.format_support_table`)."""
    from ..hooks.sitemap import format_support_table

    return format_support_table(spec)


__all__ = ["support_table"]
