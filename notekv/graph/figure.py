"""The notes graph as a plotly layered node-link figure: field -> note cells -> read heads ->
logit, the strongest ranked edges drawn with width by weight and colour by sign."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

COLUMNS = {"field": 0, "cell": 1, "head": 2, "logit": 3}
TOWARD_NEW, TOWARD_OLD = "#1f77b4", "#d62728"


def _ends(key: tuple) -> tuple[tuple, tuple]:
    kind, l = key[0], key[1]
    if kind == "fc":
        return ("field",), ("cell", l, key[2])
    if kind == "ch":
        return ("cell", l, key[2]), ("head", l, key[3])
    return ("head", l, key[2]), ("logit",)


def layered(ranked: Sequence[tuple[tuple, float]], labels: dict, *, title: str = "") -> go.Figure:
    """``ranked``: ``[(edge key, weight)]`` to draw (weight in units of the swing); ``labels``:
    ``{"field": str, "slot_order": {slot key: rank}, "slot_token": {slot key: token},
    "logit": str}``. Returns the figure (never shown)."""
    nodes: dict[tuple, None] = {}
    for key, _ in ranked:
        for end in _ends(key):
            nodes[end] = None
    order = labels.get("slot_order", {})

    def sort_key(n):
        if n[0] == "cell":
            return (n[1], order.get(n[2], 1e9), str(n[2]))
        if n[0] == "head":
            return (n[1], n[2], "")
        return (0, 0, "")
    cols: dict[int, list] = {}
    for n in sorted(nodes, key=sort_key):
        cols.setdefault(COLUMNS[n[0]], []).append(n)
    pos = {}
    for x, col in cols.items():
        for i, n in enumerate(col):
            pos[n] = (x, 1.0 - (i + 1) / (len(col) + 1))
    fig = go.Figure()
    top = max((abs(w) for _, w in ranked), default=1.0) or 1.0
    for key, w in ranked:
        a, b = _ends(key)
        (x0, y0), (x1, y1) = pos[a], pos[b]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", showlegend=False,
                                 text=f"{_name(a, labels)} -> {_name(b, labels)}: {w:+.3f} of the swing",
                                 line={"width": 0.5 + 8 * abs(w) / top, "color": TOWARD_NEW if w >= 0 else TOWARD_OLD},
                                 opacity=0.35 + 0.6 * abs(w) / top))
    xs = [pos[n][0] for n in pos]
    ys = [pos[n][1] for n in pos]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=[_name(n, labels) for n in pos],
                             textposition=["middle left" if x == 0 else "middle right" for x in xs],
                             marker={"size": 9, "color": ["#444" if n[0] != "cell" else "#2ca02c" for n in pos]},
                             hoverinfo="text", showlegend=False))
    fig.update_layout(title=title or "notes graph (edge width: share of the swing; blue toward NEW, red toward OLD)",
                      xaxis={"tickvals": [0, 1, 2, 3], "ticktext": ["field", "notes (layer, slot)", "read heads",
                                                                     "logit"], "range": [-0.6, 3.6]},
                      yaxis={"visible": False}, height=max(400, 22 * max((len(c) for c in cols.values()), default=1)),
                      template="plotly_white")
    return fig


def _name(n: tuple, labels: dict) -> str:
    if n[0] == "field":
        return labels.get("field", "field")
    if n[0] == "logit":
        return labels.get("logit", "logit diff")
    if n[0] == "head":
        return f"L{n[1]}.H{n[2]}"
    tok = labels.get("slot_token", {}).get(n[2])
    return f"L{n[1]} {tok!r} ({n[2]})" if tok is not None else f"L{n[1]} {n[2]}"
