"""Optional backends: the same notekv site strings and intervention objects, run through
other interpretability libraries, for cross-checking results and for users of those tools.

* :class:`notekv.backends.tl.TLBackend` -- a TransformerLens 4.3 ``TransformerBridge``
  (``pip install notekv[tl]``);
* :class:`notekv.backends.nnsight.NNsightBackend` -- an nnsight 0.8.1 ``TransformersModel``
  (``pip install notekv[nnsight]``).

Both take a loaded :class:`~notekv.HookedModel` and offer ``run(inputs, collect=[...],
interventions=[...]) -> Run`` with the native shapes; anything they cannot do raises
``NotImplementedError`` naming the site (or intervention) and the backend. Importing this
package imports neither library; :func:`support_table` says what each backend supports.
"""

from __future__ import annotations

from ..hooks.sites import GLOBAL_SITES, LAYER_SITES

_INTERVENTIONS = ("Collect", "Patch", "Ablate", "Steer", "Hook", "Knockout", "KVPatch")
_NOTES = {
    ("TL", "attn.q"): "yes¹", ("TL", "attn.k"): "yes¹",
    ("nnsight", "attn.q"): "yes³", ("nnsight", "attn.k"): "yes³",
    ("TL", "resid_mid"): "yes²", ("nnsight", "resid_mid"): "yes²", ("native", "resid_mid"): "yes²",
}


def support_table() -> str:
    """A markdown table of which site names and interventions each backend supports."""
    from . import nnsight as nn_backend
    from . import tl as tl_backend

    supported = {"native": set(GLOBAL_SITES + LAYER_SITES), "TL": set(tl_backend.SUPPORTED_SITES),
                 "nnsight": set(nn_backend.SUPPORTED_SITES)}
    cols = ("native", "TL", "nnsight")
    lines = ["| site | native | TL | nnsight |", "|---|---|---|---|"]
    for name in GLOBAL_SITES[:1] + LAYER_SITES + GLOBAL_SITES[1:]:
        cells = [(_NOTES.get((c, name), "yes") if name in supported[c] else "no") for c in cols]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "| intervention | native | TL | nnsight |", "|---|---|---|---|"]
    for iv in _INTERVENTIONS:
        other = "no" if iv in ("Knockout", "KVPatch") else "yes"
        lines.append(f"| `{iv}` | yes | {other} | {other} |")
    lines += [
        "",
        "¹ where the bridge exposes `hook_rot_q`/`hook_rot_k` (not GPT-NeoX, whose partial rotary has none).",
        "² not on parallel-residual models (GPT-NeoX). Head suffixes (`.h{n}`) work wherever the site does.",
        "³ read at the `apply_rotary_pos_emb` call inside the attention forward (nnsight `.source`).",
        "Unsupported combinations raise `NotImplementedError` naming the site and the backend.",
    ]
    return "\n".join(lines)


__all__ = ["support_table"]
