"""The report page: plotly figures with captions, the circuit's tables and one prompt with
its notes highlighted, assembled into one standalone ``index.html`` (plotly embedded)."""

from __future__ import annotations

import html

from . import figures


def _fmt(s: dict | None) -> str:
    if not s or s.get("mean") is None or s["mean"] != s["mean"]:
        return "n/a"
    return f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] (n={s['n']})"


def figures_of(d: dict) -> dict:
    """``{name: (figure, caption)}`` of a report's data (empty when nothing was located)."""
    if "recovery" not in d:
        return {}
    rec, fr = d["recovery"], d["recovery"]["fractions"]
    L = len(rec["per_layer"])
    n_ev, n_used = d["n_evaluation"], d["n_used"]
    out = {}
    if "kv_heatmap" in d:
        kh = d["kv_heatmap"]
        how = ("estimated by KV attribution (key-fixed; the prompt is too long to patch every cell)"
               if kh.get("method") == "attribution" else "patched exactly, one cell at a time")
        out["kv_heatmap"] = (
            figures.heatmap(kh["grid"], kh["tokens"], f"KV patching of one (layer, slot), field to decision (n={kh['n']})",
                            kh["positions"]),
            f"Recovery when OLD's cache takes NEW's K and V at one layer and one slot before the decision token is "
            f"decoded, {how}; slots from the field to the decision, aligned at the decision, mean over {kh['n']} "
            "evaluation pairs. The paper's main figure: where the notes sit and at which depth.")
    out.update(_attribution_figures(d))
    hm = d["heatmap"]
    out["recovery_heatmap"] = (
        figures.heatmap(hm["grid"], hm["tokens"], f"resid_pre activation patching, one position at a time (n={hm['n']})",
                        hm.get("positions")),
        f"Recovery when NEW's residual stream entering a layer replaces OLD's at one position (the rest of the "
        f"forward recomputed), mean over {hm['n']} evaluation pairs.")
    out["regions"] = (
        figures.bars(["field only", "after the field", "field + downstream"],
                     [rec["field_only"], rec["after_field"], rec["downstream"]], "KV patching by region"),
        f"Recovery of NEW's K/V at the field's slots only, at every slot after it, and at both (all layers); "
        f"mean and 95% bootstrap interval over n={rec['field_only']['n']} usable pairs.")
    out["fraction_curves"] = (
        figures.curves({"last fraction of the downstream": (fr, rec["suffix_fraction"]),
                        "first fraction of the downstream": (fr, rec["prefix_fraction"])},
                       f"KV patching of a fraction of the downstream (n={n_used})", "fraction"),
        "Recovery when only the last (or first) fraction of the slots from the field to the decision take NEW's K/V.")
    out["layer_curves"] = (
        figures.curves({"KV, all downstream slots": (list(range(L)), rec["per_layer"]),
                        **{f"act {s}": (list(range(L)), d["activation_patching"][f"per_layer_{s}"])
                           for s in ("attn_out", "mlp_out")}},
                       "Patching one layer", "layer"),
        f"KV: NEW's K/V at every downstream slot of one layer (n={n_used}); act: NEW's attention or MLP output at "
        f"every position from the field on, one layer at a time (n={d['activation_patching']['n']}).")
    out["top_vs_random"] = (
        figures.curves({"top-k (ranked on selection pairs)": ([r["k"] for r in rec["top_k"]], rec["top_k"]),
                        "random k": ([r["k"] for r in rec["random_k"]], rec["random_k"])},
                       f"Top-k note positions vs random (evaluation pairs, n={n_ev})", "k"),
        f"Offsets from the decision ranked by single-slot recovery on {d['n_selection']} selection pairs, patched "
        f"together on the {n_ev} evaluation pairs, against k random downstream slots.")
    out["knockout"] = (
        figures.curves({"recovery": ([k["fraction"] for k in d["knockout"]], [k["recovery"] for k in d["knockout"]]),
                        "flip rate": ([k["fraction"] for k in d["knockout"]],
                                      [{"mean": k["flip"]["rate"], "ci": k["flip"]["ci"]} for k in d["knockout"]])},
                       "Field-only cache with the top notes knocked out", "fraction of downstream keys",
                       secondary=("flip rate",)),
        f"The field-only cache (NEW field, stale notes); the decision query may not read the top fraction of ranked "
        f"notes at any layer. Recovery (left axis) and the rate of decisions that flip to NEW (right axis), n={n_ev}.")
    out["attention_mass"] = (
        figures.bars([k for k in d["attention_mass"] if k != "sinks"],
                     [v for k, v in d["attention_mass"].items() if k != "sinks"],
                     "Decision query attention by region (OLD cache)", "attention mass"),
        f"Share of the decision query's attention (mean over heads and layers) on each region, n={n_used}.")
    out["head_dla"] = (
        figures.head_grid(d["head_dla_grid"], "Head DLA, NEW - OLD (selection pairs)", "logit diff"),
        f"Direct logit attribution of each head's decision-step output onto good - bad, NEW minus OLD, signed by "
        f"the rule; mean over {d['n_selection']} selection pairs.")
    joint = d["read_heads_joint"]
    out["read_heads_joint"] = (
        figures.curves({"top-k heads patched together": ([r["k"] for r in joint], joint)},
                       f"Read heads: NEW's per-head output at the decision, top-k by DLA (n={n_ev})", "k"),
        "The heads ranked by DLA on selection pairs; their decision-step outputs (attn.z) patched from NEW "
        "into OLD together, on evaluation pairs.")
    out["write"] = (
        figures.stacked_layers(d["write"]["attn_per_layer"], d["write"]["mlp_per_layer"],
                               "Who writes the notes (post-field positions)"),
        f"Per-layer attention and MLP contributions to NEW - OLD of the final residual at post-field positions, "
        f"projected on it (n={d['write']['n']}).")
    return out


def _attribution_figures(d: dict) -> dict:
    at = d.get("attribution")
    if not at or "agreement" not in at:
        return {}
    out = {}
    sc, ag = at["scatter"], at["agreement"]
    rho = ag["cells"].get("spearman", {})
    out["attribution_scatter"] = (
        figures.scatter({"key-fixed (AtP*)": (sc["exact"], sc["estimate"]), "no key fix (AtP)": (sc["exact"], sc["plain"])},
                        "KV attribution vs exact patching (verified cells)", "exact recovery", "estimated recovery"),
        f"Each point one (layer, slot) cell of {sc['n_pairs']} evaluation pairs: its {at['verified_cells_per_pair'] // 2} "
        f"largest estimates and as many random cells, patched exactly. Over {ag['n_pairs']} pairs: Spearman "
        f"{_fmt(rho)} with the key fix, {_fmt(ag['cells_no_key_fix'].get('spearman'))} without.")
    hm = at["heatmap"]
    out["attribution_heatmap"] = (
        figures.heatmap(hm["grid"], hm["tokens"], f"KV attribution per (layer, slot), field to decision (n={hm['n']})",
                        hm["positions"]),
        f"Estimated recovery of each (layer, slot) cell from one decode step and one backward pass per pair (the "
        f"decision query's attention recomputed exactly for the patched key), mean over {hm['n']} evaluation pairs. "
        f"Notes and heads here were ranked by {at['method']} patching.")
    return out


def _summary_table(d: dict) -> str:
    paper = d["paper"]
    rec = d["recovery"]
    am = d["attention_mass"]
    rows = [
        ("distinct pairs / flipping / moved by the field", f"{d['n_pairs']} / {d['n_flipping']} / {d.get('n_moved', '?')}",
         "(screen: " + d.get("screen", "flip") + ")"),
        ("field-only recovery", _fmt(rec["field_only"]), paper["field_only"]),
        ("field + downstream", _fmt(rec["downstream"]), paper["downstream"]),
        ("top-8 positions", _fmt(rec["top_k_at"]), paper["top_k"]),
        ("8 random positions", _fmt(rec["random_k_at"]), paper["random_k"]),
        ("attention: field / downstream / sink",
         " / ".join(f"{am[k]['mean']:.3f}" if k in am else "n/a" for k in ("field", "downstream", "sink")),
         paper["attention_mass"]),
        ("read heads, joint top-12", _fmt(d["read_heads_joint"][-1]), paper["read_heads"]),
        ("attention share of the write", _fmt(d["write"]["attn_share"]), paper["write.attn_share"]),
        ("direction vs random", f"{d['direction']['recovery']['mean']:.3f} vs {d['direction']['random']['mean']:.3f}",
         paper["direction"]),
    ]
    at = d.get("attribution")
    if at and "agreement" in at:
        cells = at["agreement"]["cells"]
        rows.append((f"notes and heads ranked by ({at['method']} patching)",
                     f"KV attribution vs exact: Spearman {_fmt(cells.get('spearman'))}, top-8 overlap "
                     f"{_fmt(cells.get('top8_overlap'))}", f"exact above {at['threshold_positions']} positions is "
                     "replaced by attribution + exact checks"))
    body = "".join(f"<tr><td>{a}</td><td>{html.escape(str(b))}</td><td>{c}</td></tr>" for a, b, c in rows)
    return f"<table><tr><th>measure</th><th>this model</th><th>paper (4-32B)</th></tr>{body}</table>"


def _notes_table(d: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(repr(n['token']))}</td><td>{n['position']}</td><td>{n['offset']}</td><td>{n['region']}</td>"
        f"<td>{n['recovery_selection']:.3f}</td><td>{_fmt(n.get('evaluation'))}</td></tr>" for n in d.get("notes", []))
    return ("<h2>The notes</h2><p>Downstream slots ranked by single-slot KV-patch recovery on the selection pairs; "
            "position is the absolute slot in the example pair, offset the distance from the decision token. The "
            "last column is the same offset's recovery on the evaluation pairs.</p>"
            "<table><tr><th>token</th><th>position</th><th>offset</th><th>region</th><th>selection</th>"
            f"<th>evaluation (mean, 95% CI, n)</th></tr>{rows}</table>")


def _heads_table(d: dict, k: int = 12) -> str:
    rows = "".join(f"<tr><td>L{h['layer']}.h{h['head']}</td><td>{h['dla_selection']:.3f}</td>"
                   f"<td>{h['mean']:.3f} [{h['ci'][0]:.3f}, {h['ci'][1]:.3f}]</td></tr>" for h in d["read_heads"][:k])
    return ("<h2>Read heads</h2><p>Heads ranked by DLA on selection pairs; recovery of patching one head's "
            "decision-step output on evaluation pairs.</p><table><tr><th>head</th><th>DLA (selection)</th>"
            f"<th>recovery (evaluation)</th></tr>{rows}</table>")


def _example(d: dict) -> str:
    """One evaluation pair's prompt, each downstream token shaded by its single-slot recovery."""
    ex = d.get("example")
    if not ex:
        return ""
    spans = []
    for tok, region, r in zip(ex["tokens"], ex["regions"], ex["recovery"]):
        text = html.escape(tok).replace("\n", "&#8629;<br>")
        if r is None:
            style = "font-weight:bold" if region == "field" else "color:#666"
            spans.append(f"<span style='{style}'>{text}</span>")
        else:
            a = min(1.0, abs(r))
            colour = f"rgba(214,39,40,{a:.2f})" if r > 0 else f"rgba(31,119,180,{a:.2f})"
            spans.append(f"<span title='recovery {r:.3f}' style='background:{colour}'>{text}</span>")
    return (f"<h2>One pair, notes highlighted</h2><p>OLD value {html.escape(ex['old_value'])!s}, NEW value "
            f"{html.escape(ex['new_value'])}: the field in bold; each downstream token shaded by the recovery of "
            "NEW's K/V at that slot alone (red positive, blue negative; hover for the value).</p>"
            f"<div style='font-family:monospace;font-size:12px;line-height:1.6'>{''.join(spans)}</div>")


def html_page(d: dict, figs: dict) -> str:
    import plotly.offline

    meta = (f"seed {d['seed']} · {d.get('dtype', 'float32')} · notekv {d.get('notekv_version', '?')} · "
            "model fingerprint "
            f"{html.escape(str(d.get('fingerprint', '?')))} · {d.get('seconds', 0):.0f} s")
    skipped = d.get("skipped_values") or []
    skip = (f"<p>Skipped values ({len(skipped)}): " + "; ".join(html.escape(s["reason"]) for s in skipped) + "</p>"
            if skipped else "")
    parts = [f"<figure>{fig.to_html(full_html=False, include_plotlyjs=False)}<figcaption>{html.escape(cap)}"
             "</figcaption></figure>" for fig, cap in figs.values()]
    body = ""
    if "recovery" in d:
        body = _summary_table(d) + _notes_table(d) + _example(d) + "".join(parts[:2]) + _heads_table(d) + "".join(parts[2:])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>notekv circuit report</title>"
            f"<script>{plotly.offline.get_plotlyjs()}</script>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;padding:4px}"
            "table{border-collapse:collapse}figcaption{color:#444;font-size:13px;margin-bottom:24px}</style>"
            "</head><body>"
            f"<h1>{html.escape(d['model'])} / {html.escape(d['scenario'])}</h1><p>{html.escape(d['verdict'])}</p>"
            f"<p style='color:#666'>{meta}</p>{skip}{body}"
            f"<p style='color:#666'>Method: {html.escape(d.get('citation', ''))}.</p></body></html>")
