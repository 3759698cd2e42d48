"""Plotly figures of a circuit report (returned, never shown)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative

PALETTE = qualitative.Plotly


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def heatmap(grid: list[list[float]], tokens: list[str], title: str, positions: list[int] | None = None,
            xaxis: str = "position (absolute slot: token)", counts: list[int] | None = None,
            n: int | None = None) -> go.Figure:
    """Layer x position recovery, x labels ``slot:token`` (absolute slots), values rounded.
    ``counts``: pairs pooled in each column; a column with fewer than ``n`` says ``(n=k)``."""
    positions = list(range(len(tokens))) if positions is None else positions
    labels = [f"{p}:{t!r}" for p, t in zip(positions, tokens)]
    if counts is not None and n is not None:
        labels = [lab + (f" (n={c})" if c < n else "") for lab, c in zip(labels, counts)]
    z = [[None if v != v else round(float(v), 3) for v in row] for row in grid]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=list(range(len(grid))), colorscale="RdBu_r", zmid=0,
                               colorbar={"title": "recovery"},
                               hovertemplate="layer %{y}<br>%{x}<br>recovery %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title="layer", height=520)
    return fig


def curves(series: dict[str, tuple[list[float], list[dict]]], title: str, xaxis: str,
           secondary: tuple[str, ...] = (), yaxis: str = "recovery (mean, 95% CI)",
           y2axis: str = "rate (95% Wilson CI)") -> go.Figure:
    """Lines with interval bands in the line's own colour: ``{name: (x, [summary{mean, ci}])}``.
    Series named in ``secondary`` go on a right-hand axis (a rate beside a recovery)."""
    fig = go.Figure()
    for i, (name, (x, summ)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        axis = "y2" if name in secondary else "y"
        mean = [s["mean"] for s in summ]
        lo = [s["ci"][0] for s in summ]
        hi = [s["ci"][1] for s in summ]
        fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=hi + lo[::-1], fill="toself", mode="lines",
                                 fillcolor=_rgba(colour, 0.18), line={"width": 0, "color": colour}, showlegend=False,
                                 hoverinfo="skip", legendgroup=name, name=name, yaxis=axis))
        fig.add_trace(go.Scatter(x=list(x), y=mean, mode="lines+markers", name=name, line={"color": colour},
                                 marker={"color": colour}, legendgroup=name, yaxis=axis))
    layout = {"title": title, "xaxis_title": xaxis, "yaxis_title": yaxis, "height": 420}
    if secondary:
        # ticks of its own (plotly would otherwise place them at the left axis' gridlines: 0.156, 0.39...)
        layout["yaxis2"] = {"title": y2axis, "overlaying": "y", "side": "right", "range": [0, 1],
                            "tickmode": "linear", "tick0": 0, "dtick": 0.2, "showgrid": False}
    fig.update_layout(**layout)
    return fig


def bars(names: list[str], summ: list[dict], title: str, yaxis: str = "recovery") -> go.Figure:
    fig = go.Figure(go.Bar(
        x=names, y=[s["mean"] for s in summ],
        error_y={"type": "data", "symmetric": False,
                 "array": [s["ci"][1] - s["mean"] for s in summ],
                 "arrayminus": [s["mean"] - s["ci"][0] for s in summ]}))
    fig.update_layout(title=title, yaxis_title=yaxis, height=420)
    return fig


def head_grid(grid: list[list[float]], title: str, colorbar: str) -> go.Figure:
    z = [[round(float(v), 3) for v in row] for row in grid]
    fig = go.Figure(go.Heatmap(z=z, colorscale="RdBu_r", zmid=0, colorbar={"title": colorbar}))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=520)
    fig.update_xaxes(tickmode="linear", tick0=0, dtick=1)  # whole heads, not the cell edges at 0.5
    return fig


def stacked_layers(attn: list[dict], mlp: list[dict], title: str,
                   yaxis: str = "share of the residual delta (mean, 95% CI)") -> go.Figure:
    """Attention and MLP bars per layer, ``[summary{mean, ci}]`` each, with their intervals."""
    x = list(range(len(attn)))

    def bar(summ, name):
        mean = [s["mean"] for s in summ]
        return go.Bar(x=x, y=mean, name=name, error_y={
            "type": "data", "symmetric": False, "array": [s["ci"][1] - s["mean"] for s in summ],
            "arrayminus": [s["mean"] - s["ci"][0] for s in summ]})
    fig = go.Figure([bar(attn, "attention"), bar(mlp, "MLP")])
    fig.update_layout(barmode="group", title=title, xaxis_title="layer that writes", yaxis_title=yaxis, height=420)
    return fig


def scatter(series: dict[str, tuple[list[float], list[float]]], title: str, xaxis: str, yaxis: str) -> go.Figure:
    """Points ``{name: (x, y)}`` and the diagonal ``y = x``."""
    fig = go.Figure()
    xs = [v for x, _ in series.values() for v in x] or [0.0]
    lo, hi = min(xs), max(xs)
    for i, (name, (x, y)) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=[round(v, 4) for v in x], y=[round(v, 4) for v in y], mode="markers", name=name,
                                 marker={"color": PALETTE[i % len(PALETTE)], "size": 6, "opacity": 0.7}))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"color": "#888", "dash": "dot"}))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=460)
    return fig
