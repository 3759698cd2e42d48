"""Standalone ``index.html`` for an edit evaluation (plotly bundled inline: opens offline)."""

from __future__ import annotations

import html
import math
from pathlib import Path


def _err(row_rate: float, ci) -> tuple[float, float]:
    lo, hi = (ci or [None, None])
    if row_rate is None or lo is None or (isinstance(row_rate, float) and math.isnan(row_rate)):
        return 0.0, 0.0
    return hi - row_rate, row_rate - lo


def figures(result: dict) -> list:
    """The report's plotly figures (returned, never shown)."""
    import plotly.graph_objects as go

    rows = result["modes"] + result["controls"]
    names = [r["mode"] for r in rows]
    figs = []

    def bars(key, ci_key, label):
        vals = [r[key] for r in rows]
        errs = [_err(r[key], r[ci_key]) for r in rows]
        return go.Bar(name=label, x=names, y=vals, text=[f"n={r['n']}" for r in rows], textposition="outside",
                      error_y=dict(type="data", symmetric=False, array=[e[0] for e in errs], arrayminus=[e[1] for e in errs]))

    f = go.Figure([bars("p_correct", "ci", "P(correct), calibrated"), bars("raw_p_correct", "raw_ci", "P(correct), raw argmax")])
    f.update_layout(title=f"P(correct) per mode and control (Wilson 95%) - {result['model']}, {result['scenario']}",
                    barmode="group", yaxis=dict(range=[0, 1.15], title="P(correct)"), height=480)
    figs.append(f)

    f = go.Figure()
    for key, label in (("p_positive_when_expected_positive", "expected answer positive"),
                       ("p_positive_when_expected_negative", "expected answer negative")):
        vals = [r[key]["rate"] for r in rows]
        errs = [_err(r[key]["rate"], r[key]["ci"]) for r in rows]
        f.add_bar(name=label, x=names, y=vals, text=[f"n={r[key]['n']}" for r in rows], textposition="outside",
                  error_y=dict(type="data", symmetric=False, array=[e[0] for e in errs], arrayminus=[e[1] for e in errs]))
    f.update_layout(title="P(positive answer) split by the expected answer: a value-blind bias shows as high bars on the right",
                    barmode="group", yaxis=dict(range=[0, 1.15], title="P(positive, calibrated)"), height=480)
    figs.append(f)

    main = result["modes"]
    f = go.Figure(go.Scatter(
        x=[max(r["token_forwards"], 1e-2) if r["token_forwards"] == r["token_forwards"] else None for r in main],
        y=[r["p_correct"] for r in main], text=[r["mode"] for r in main], mode="markers+text", textposition="top center",
        marker=dict(size=10, color=["#d62728" if r["needs_full_recompute"] else "#1f77b4" for r in main])))
    f.update_layout(title="Cost vs P(correct) (red: needs a full recompute)", height=480,
                    xaxis=dict(type="log", title="token-forwards recomputed per edit (mean)"), yaxis=dict(title="P(correct)"))
    figs.append(f)

    f = go.Figure(go.Bar(
        x=[r["mode"] for r in main], y=[r["recovery"]["mean"] for r in main],
        error_y=dict(type="data", symmetric=False,
                     array=[(r["recovery"]["ci"][1] or 0) - (r["recovery"]["mean"] or 0) for r in main],
                     arrayminus=[(r["recovery"]["mean"] or 0) - (r["recovery"]["ci"][0] or 0) for r in main])))
    f.update_layout(title="Mean recovery (s - s_old) / (s_new - s_old), bootstrap 95%", height=420)
    figs.append(f)
    return figs


def _fmt(x, p=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{p}g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-3) else f"{x:.{p}f}"
    return html.escape(str(x))


def _table(result: dict) -> str:
    head = ("mode", "n", "P(correct) [95%]", "raw P(correct)", "P(pos | exp +)", "P(pos | exp -)", "recovery",
            "KL to full", "agree full", "tokens", "FLOPs", "wall ms", "needs full")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in result["modes"] + result["controls"]:
        ci = r["ci"]
        cells = (r["mode"], r["n"], f"{_fmt(r['p_correct'], 2)} [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]",
                 _fmt(r["raw_p_correct"], 2), _fmt(r["p_positive_when_expected_positive"]["rate"], 2),
                 _fmt(r["p_positive_when_expected_negative"]["rate"], 2), _fmt(r["recovery"]["mean"], 2),
                 _fmt(r["kl_full_mean"]), _fmt(r["agree_full"]["rate"], 2), _fmt(r["tokens_recomputed"], 1),
                 _fmt(r["flops"]), _fmt(r["wall_s"] * 1e3 if r["wall_s"] == r["wall_s"] else None, 1),
                 "yes" if r["needs_full_recompute"] else "no")
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c)) if not isinstance(c, str) else c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _auto(result: dict) -> str:
    a = result["auto"]
    if not a.get("n"):
        return "<p>auto: not run.</p>"
    parts = [f"<p>auto on {a['n']} cases: chosen {html.escape(str(a['chosen']))}; pre-filter decided {a['prefiltered']}.</p><ul>"]
    for k in ("raw", "calibrated"):
        x = a[k]
        parts.append(f"<li>{k} truth: {x['insufficient']} cases where in_place is insufficient; auto escalated "
                     f"{x['predicted']}; precision {_fmt(x['precision']['rate'], 2)} (n={x['precision']['n']}, "
                     f"CI {_fmt(x['precision']['ci'][0], 2)}-{_fmt(x['precision']['ci'][1], 2)}), recall "
                     f"{_fmt(x['recall']['rate'], 2)} (n={x['recall']['n']}, CI {_fmt(x['recall']['ci'][0], 2)}-"
                     f"{_fmt(x['recall']['ci'][1], 2)})</li>")
    parts.append("</ul>")
    return "".join(parts)


def write_html(result: dict, path: str | Path) -> Path:
    figs = figures(result)
    body = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs)]
    nf = result["noise_floor"]
    summary = (f"<p>{result['n_valid']} valid cases ({html.escape(str(result['valid_by_gate']))}); "
               f"{result['n_screened_out']} screened out ({html.escape(str(result['screened_by_gate']))}) because the "
               f"model's full recomputes did not order the values by the rule with a swing of at least "
               f"{result['settings']['min_swing']}. Runtime {result['runtime_s']:.0f} s. Noise floor (fresh prefill vs "
               f"suffix recompute, {nf['n']} cases): KL up to {_fmt(nf['kl_max'])}, max |dK| {_fmt(nf['max_abs_dk'])}.</p>")
    notes = "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"]) + "</ul>"
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>notekv edits - {html.escape(result['model'])}</title>"
           "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}</style></head><body>"
           f"<h1>Edit modes: {html.escape(result['model'])}, scenario {html.escape(result['scenario'])}</h1>{summary}"
           f"{_table(result)}{_auto(result)}{notes}" + "".join(body) + "</body></html>")
    Path(path).write_text(doc)
    return Path(path)
