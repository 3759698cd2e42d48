"""Plotly figures of a circuit report (returned, never shown)."""

from __future__ import annotations

import plotly.graph_objects as go


def heatmap(grid: list[list[float]], tokens: list[str], title: str) -> go.Figure:
    """Layer x position recovery with token labels on the x axis."""
    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=grid, x=labels, y=list(range(len(grid))), colorscale="RdBu", zmid=0,
                               colorbar={"title": "recovery"}))
    fig.update_layout(title=title, xaxis_title="position (tail of the prompt)", yaxis_title="layer", height=520)
    return fig


def curves(series: dict[str, tuple[list[float], list[dict]]], title: str, xaxis: str) -> go.Figure:
    """Lines with interval bands: ``{name: (x, [summary{mean, ci}])}``."""
    fig = go.Figure()
    for name, (x, summ) in series.items():
        mean = [s["mean"] for s in summ]
        lo = [s["ci"][0] for s in summ]
        hi = [s["ci"][1] for s in summ]
        fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=hi + lo[::-1], fill="toself", opacity=0.2,
                                 line={"width": 0}, showlegend=False, hoverinfo="skip", name=name))
        fig.add_trace(go.Scatter(x=list(x), y=mean, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title="recovery (mean, 95% CI)", height=420)
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
    fig = go.Figure(go.Heatmap(z=grid, colorscale="RdBu", zmid=0, colorbar={"title": colorbar}))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=520)
    return fig


def stacked_layers(attn: list[float], mlp: list[float], title: str) -> go.Figure:
    x = list(range(len(attn)))
    fig = go.Figure([go.Bar(x=x, y=attn, name="attention"), go.Bar(x=x, y=mlp, name="MLP")])
    fig.update_layout(barmode="group", title=title, xaxis_title="layer",
                      yaxis_title="share of the final residual delta", height=420)
    return fig
