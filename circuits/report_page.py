"""The report page: plotly figures with captions, the circuit's tables and one prompt with
its notes highlighted, assembled into one standalone ``index.html`` (plotly embedded)."""

from __future__ import annotations

import html

from . import figures, graph_stage


def _fmt(s: dict | None) -> str:
    if not s or s.get("mean") is None or s["mean"] != s["mean"]:
        return "n/a"
    return f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] (n={s['n']})"


def _pooled(h: dict) -> str:
    """What a role-pooled map pooled, in words."""
    if h.get("aligned_by") != "role":
        return f"aligned at the decision, mean over {h['n']} evaluation pairs"
    out = (f"columns are the first pair's slots, each the mean over the pairs that have the same role (see The "
           f"notes); {h['n_complete']} of {h['n']} evaluation pairs have every column")
    if h.get("left_out"):
        out += f", and {h['left_out']} slots of the others have no counterpart in the first pair (left out)"
    return out + "; a column pooling fewer pairs says (n=k)"


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
                            kh["positions"], counts=kh.get("n_per_column"), n=kh["n"]),
            f"Recovery when OLD's cache takes NEW's K and V at one layer and one slot before the decision token is "
            f"decoded, {how}; slots from the field to the decision: {_pooled(kh)}. The paper's main figure: where the "
            "notes sit and at which depth.")
    out.update(_attribution_figures(d))
    if "heatmap" in d:
        hm = d["heatmap"]
        out["recovery_heatmap"] = (
            figures.heatmap(hm["grid"], hm["tokens"],
                            f"resid_pre activation patching, one position at a time (n={hm['n']})", hm.get("positions"),
                            counts=hm.get("n_per_column"), n=hm["n"]),
            f"Recovery when NEW's residual stream entering a layer replaces OLD's at one position (the rest of the "
            f"forward recomputed); {_pooled(hm)}.")
    out["regions"] = (
        figures.bars(["field only", "after the field", "field + downstream"],
                     [rec["field_only"], rec["after_field"], rec["downstream"]],
                     f"KV patching by region (n={rec['field_only']['n']})"),
        f"Recovery of NEW's K/V at the field's slots only, at every slot after it, and at both (all layers); "
        f"mean and 95% bootstrap interval over n={rec['field_only']['n']} usable pairs.")
    out["fraction_curves"] = (
        figures.curves({"last fraction of the downstream": (fr, rec["suffix_fraction"]),
                        "first fraction of the downstream": (fr, rec["prefix_fraction"])},
                       f"KV patching of a fraction of the downstream (n={n_used})", "fraction"),
        "Recovery when only the last (or first) fraction of the slots from the field to the decision take NEW's K/V.")
    act = d.get("activation_patching")
    out["layer_curves"] = (
        figures.curves({"KV, all downstream slots": (list(range(L)), rec["per_layer"]),
                        **{f"act {s}": (list(range(L)), act[f"per_layer_{s}"])
                           for s in ("attn_out", "mlp_out") if act}},
                       f"Patching one layer (KV n={n_used}, act n={act['n'] if act else 0})", "layer"),
        f"KV: NEW's K/V at every downstream slot of one layer (n={n_used}); act: NEW's attention or MLP output at "
        f"every position from the field on, one layer at a time "
        f"({'n=' + str(act['n']) if act else _few(d, 'activation_patching')}).")
    out.update(_located_figures(d))
    out.update(graph_stage.figures_of(d))
    return out


def _slots(rec: dict) -> str:
    """Slots from the field to the decision per pair: ``14`` or ``13-15 (median 14)``."""
    n = rec.get("n_slots")
    if not n:
        return "?"
    return str(n["min"]) if n["min"] == n["max"] else f"{n['min']}-{n['max']} (median {n['median']:g})"


def _k8(fk: dict) -> str:
    return f", so k=8 is {fk[8]['mean']:.0%} of them" if 8 in fk else ""


def _few(d: dict, part: str) -> str:
    """Why ``part`` of the report did not run (``too few pairs (n=...)``), or ``n/a``."""
    return (d.get("too_few_pairs") or {}).get(part, "n/a")


def _located_figures(d: dict) -> dict:
    """The figures of the parts that rank on selection pairs and report on evaluation pairs
    (each only when its part ran)."""
    rec, n_ev, n_used = d["recovery"], d["n_evaluation"], d["n_used"]
    out = {}
    if "top_k" in rec:
        slots = _slots(rec)
        fk = {r["k"]: r for r in rec.get("k_as_fraction", [])}
        ks = [r["k"] for r in rec["top_k"]]
        labels = [f"{k} ({fk[k]['mean']:.0%})" if k in fk else str(k) for k in ks]
        out["top_vs_random"] = (
            figures.curves({"top-k (ranked on selection pairs)": (labels, rec["top_k"]),
                            "random k": (labels, rec["random_k"])},
                           f"Top-k note positions vs random (evaluation pairs, n={n_ev})",
                           "k (its mean share of the slots from the field on)"),
            f"Note roles ranked by single-slot recovery on {d['n_selection']} selection pairs, patched together on the "
            f"{n_ev} evaluation pairs, against k random slots from the field on. Here there are {slots} such slots per "
            f"pair{_k8(fk)}; the paper's prompts have hundreds, where 8 is a few percent: compare at the same fraction "
            "in the next figure.")
    if "top_fraction" in rec:
        out["top_vs_random_fraction"] = (
            figures.curves({"top (ranked on selection pairs)": ([r["fraction"] for r in rec["top_fraction"]],
                                                                rec["top_fraction"]),
                            "random": ([r["fraction"] for r in rec["random_fraction"]], rec["random_fraction"])},
                           f"Top vs random at a fraction of the slots (evaluation pairs, n={n_ev})",
                           "fraction of the slots from the field on (k = ceil(fraction x slots), at least 1)"),
            "The same comparison at k set by the fraction of each pair's slots from the field to the decision, the "
            "scale-free form of the paper's top-8 vs 8 random: " + ", ".join(
                f"{r['fraction']:.0%} is k={r['k']['mean']:.1f}" for r in rec["top_fraction"]) + " here, on average.")
    if "knockout" in d:
        out["knockout"] = (
            figures.curves({"recovery": ([k["fraction"] for k in d["knockout"]], [k["recovery"] for k in d["knockout"]]),
                            "flip rate": ([k["fraction"] for k in d["knockout"]],
                                          [{"mean": k["flip"]["rate"], "ci": k["flip"]["ci"]} for k in d["knockout"]])},
                           f"Field-only cache with the top notes knocked out (evaluation pairs, n={n_ev})",
                           "fraction of downstream keys",
                           secondary=("flip rate",)),
            f"The field-only cache (NEW field, stale notes); the decision query may not read the top fraction of ranked "
            f"notes at any layer. Recovery (left axis) and the rate of decisions that flip to NEW (right axis), n={n_ev}.")
    out["attention_mass"] = (
        figures.bars([k for k in d["attention_mass"] if k != "sinks"],
                     [v for k, v in d["attention_mass"].items() if k != "sinks"],
                     f"Decision query attention by region (OLD cache, n={n_used})", "attention mass"),
        f"Share of the decision query's attention (mean over heads and layers) on each region, n={n_used}.")
    if "head_dla_grid" in d:
        out["head_dla"] = (
            figures.head_grid(d["head_dla_grid"], f"Head DLA, NEW - OLD (selection pairs, n={d['n_selection']})",
                              "logit diff"),
            f"Direct logit attribution of each head's decision-step output onto good - bad, NEW minus OLD, signed by "
            f"the rule; mean over {d['n_selection']} selection pairs.")
    if "read_heads_joint" in d:
        joint = d["read_heads_joint"]
        out["read_heads_joint"] = (
            figures.curves({"top-k heads patched together": ([r["k"] for r in joint], joint)},
                           f"Read heads: NEW's per-head output at the decision, top-k by DLA (n={n_ev})", "k"),
            "The heads ranked by DLA on selection pairs; their decision-step outputs (attn.z) patched from NEW "
            "into OLD together, on evaluation pairs.")
    if "write" in d and "read_layers" in d["write"]:
        w = d["write"]
        at = ", ".join(f"L{l}" for l in w["read_layers"])
        out["write"] = (
            figures.stacked_layers(w["attn_by_source"], w["mlp_by_source"],
                                   f"Who writes the notes the read heads read (into {at}; n={w['n']})"),
            f"NEW - OLD of resid_pre (the input of the norm that makes K and V) entering the read layers {at} ("
            f"{w['layers_chosen']}) at the slots after the field, split exactly into the attention and MLP output of "
            f"each layer below and projected on it; the share of each writing layer, averaged over the read layers "
            f"(a layer at or above a read layer adds nothing to it). Mean and 95% bootstrap interval over "
            f"n={w['n']} evaluation pairs; the shares close to 1 within {w['closure']:.1e}.")
        L = len(w["attn_share_by_layer"])
        out["write_by_layer"] = (
            figures.curves({"attention share": (list(range(L)), w["attn_share_by_layer"])},
                           f"Attention's share of the write into each layer's K/V input (n={w['n']})", "layer read",
                           yaxis="attention share (mean, 95% CI)"),
            f"For every layer: the attention outputs' share of the NEW - OLD delta of its resid_pre at the slots after "
            f"the field (the MLPs hold the rest); the read layers are {at}. n={w['n']} evaluation pairs.")
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
                        hm["positions"], counts=hm.get("n_per_column"), n=hm["n"]),
        f"Estimated recovery of each (layer, slot) cell from one decode step and one backward pass per pair (the "
        f"decision query's attention recomputed exactly for the patched key); {_pooled(hm)}. "
        f"Notes and heads here were ranked by {at['method']} patching.")
    return out


def _share8(rec: dict) -> str:
    fk = {r["k"]: r for r in rec.get("k_as_fraction", [])}
    return f" ({fk[8]['mean']:.0%} of the slots here)" if 8 in fk else ""


def _fraction_rows(d: dict) -> list[tuple]:
    """Top and random at the same fraction of the slots as the paper's 8 of hundreds."""
    rec = d["recovery"]
    if "top_fraction_at" not in rec:
        return []
    t, r = rec["top_fraction_at"], rec["random_fraction_at"]
    k = f"k={t['k']['mean']:.1f} on average" if t["k"]["mean"] % 1 else f"k={t['k']['mean']:.0f}"
    return [(f"top {t['fraction']:.0%} of the slots ({k})", _fmt(t), "top-8 of hundreds ~0.75"),
            (f"random {r['fraction']:.0%} of the slots ({k})", _fmt(r), "8 random of hundreds ~0.01")]


def _direction_at(d: dict) -> str:
    di = d.get("direction")
    if not di or "token" not in di:
        return ""
    return f" (resid_pre of L{di['layer']} at {di['token']!r}, the top note after the field)"


def _write_row(d: dict) -> str:
    w = d.get("write")
    if not w or "read_layers" not in w:
        return "attention share of the write"
    return (f"attention share of the write into the read layers' K/V input (resid_pre of "
            f"{', '.join(f'L{l}' for l in w['read_layers'])})")


def _delim_cell(d: dict) -> str:
    dl = d.get("delimiters")
    if not dl:
        return _few(d, "notes_knockout")
    m, s = dl["mass_share"], dl["slot_share"]
    return (f"{m['mean']:.2f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}] / {s['mean']:.2f} (n={dl['excess']['n']}): "
            f"{dl['finding'].split(':')[0]}")


def _summary_table(d: dict) -> str:
    paper = d["paper"]
    rec = d["recovery"]
    am = d["attention_mass"]
    rows = [
        ("distinct pairs / flipping / moved by the field", f"{d['n_pairs']} / {d['n_flipping']} / {d.get('n_moved', '?')}",
         "(screen: " + d.get("screen", "flip") + ")"),
        ("field-only recovery", _fmt(rec["field_only"]), paper["field_only"]),
        ("field + downstream", _fmt(rec["downstream"]), paper["downstream"]),
        ("slots from the field to the decision, per pair", _slots(rec),
         paper.get("downstream_slots", "hundreds")),
        (f"top-8 positions{_share8(rec)}", _fmt(rec["top_k_at"]) if "top_k_at" in rec else _few(d, "notes_knockout"),
         paper["top_k"]),
        (f"8 random positions{_share8(rec)}",
         _fmt(rec["random_k_at"]) if "random_k_at" in rec else _few(d, "notes_knockout"), paper["random_k"]),
        *_fraction_rows(d),
        ("attention: field / downstream / sink",
         " / ".join(f"{am[k]['mean']:.3f}" if k in am else "n/a" for k in ("field", "downstream", "sink")),
         paper["attention_mass"]),
        ("read heads, joint top-12",
         _fmt(d["read_heads_joint"][-1]) if d.get("read_heads_joint") else _few(d, "read_heads"), paper["read_heads"]),
        (_write_row(d), _fmt(d["write"]["attn_share"]) if "write" in d else _few(d, "write"),
         paper["write.attn_share"]),
        ("notes on delimiter tokens: share of the note recovery / share of the slots", _delim_cell(d),
         paper.get("delimiters", "notes on delimiters")),
        (f"direction vs random{_direction_at(d)}",
         f"{_fmt(d['direction']['recovery'])} vs {_fmt(d['direction']['random'])}" if "direction" in d
         else _few(d, "direction"), paper["direction"]),
    ]
    c = d.get("circuit")
    if c:
        dp = c["dispersion"]
        rows.append(("notes graph: write / read evenness (paired difference)",
                     f"{_fmt(dp['write']['evenness'])} / {_fmt(dp['read']['evenness'])} "
                     f"({_fmt(dp['evenness_write_minus_read'])}): "
                     + {True: "shows", False: "does not show", None: "too few pairs to tell"}[dp["shows"]],
                     paper.get("circuit", "distributed write, concentrated read")))
    at = d.get("attribution")
    if at and "agreement" in at:
        cells = at["agreement"]["cells"]
        rows.append((f"notes and heads ranked by ({at['method']} patching)",
                     f"KV attribution vs exact: Spearman {_fmt(cells.get('spearman'))}, top-8 overlap "
                     f"{_fmt(cells.get('top8_overlap'))}", f"exact above {at['threshold_positions']} positions is "
                     "replaced by attribution + exact checks"))
    body = "".join(f"<tr><td>{a}</td><td>{html.escape(str(b))}</td><td>{c}</td></tr>" for a, b, c in rows)
    return f"<table><tr><th>measure</th><th>this model</th><th>paper (4-32B)</th></tr>{body}</table>"


def _too_few_section(d: dict) -> str:
    """The parts of the report that did not run, each with its "too few pairs (n=...)"."""
    few = d.get("too_few_pairs") or {}
    if not few:
        return ""
    items = "".join(f"<li>{html.escape(part.replace('_', ' '))}: {html.escape(why)}</li>" for part, why in few.items())
    return (f"<h2>Not run</h2><p>The usable pairs split into {d['n_selection']} selection and {d['n_evaluation']} "
            f"evaluation pairs, too few in a half for these parts:</p><ul>{items}</ul>")


def _notes_table(d: dict) -> str:
    if "notes" not in d:
        return f"<h2>The notes</h2><p>{html.escape(_few(d, 'notes_knockout'))}</p>"
    pooled = d.get("notes_pooled") or {}
    n_sel, n_ev = pooled.get("n_selection", d["n_selection"]), pooled.get("n_evaluation", d["n_evaluation"])

    def row(n):
        if "role" not in n:  # a report of an earlier version: slots aligned by offset
            return (f"<tr><td>{html.escape(repr(n['token']))}</td><td>offset {n['offset']}</td><td>{n['region']}</td>"
                    f"<td>{n['position']}</td><td>{n['recovery_selection']:.3f}</td><td>"
                    f"{_fmt(n.get('evaluation'))}</td></tr>")
        pos = "-" if n["position"] is None else n["position"]
        toks = n.get("tokens") or [n["token"]]
        shown = ", ".join(repr(t) for t in toks[:4]) + (", ..." if len(toks) > 4 else "")
        return (f"<tr><td>{html.escape(shown)}</td><td>{html.escape(n['where'])}</td><td>{n['region']}</td>"
                f"<td>{pos}</td><td>{n['recovery_selection']:.3f} (n={n['n_selection']} of {n_sel})</td>"
                f"<td>{_fmt(n.get('evaluation'))}</td></tr>")
    rows = "".join(row(n) for n in d["notes"])
    al = d.get("alignment") or {}
    layouts = (f" The {al['n_pairs']} usable pairs have {al['n_layouts']} layouts from the field to the decision "
               f"(names, ids and values of different token lengths); the largest holds {al['largest_layout']} pairs."
               if al.get("n_layouts") else "")
    every = (f" {pooled['roles_in_every_selection_pair']} of the {pooled['roles']} roles occur in every selection pair."
             if pooled else "")
    return ("<h2>The notes</h2><p>Slots from the field to the decision, pooled across pairs by role and ranked by "
            "single-slot KV-patch recovery on the selection pairs. A role is what the slot is, not how far it sits "
            "from the decision: the field's slots by their place before or in the value; a later slot by its token "
            "and its occurrence counted back from the decision, when every usable pair has that token there; text "
            "that varies between pairs (a name, an id) by its place after the last such slot. Each mean pools only "
            "the pairs that have the "
            f"role (n of {n_sel} selection pairs; the last column's n counts evaluation pairs, of {n_ev}).{layouts}"
            f"{every} Slot is the role's absolute slot in the example pair below. A slot before the value holds the "
            "same K/V in OLD and NEW, so its recovery is 0.</p>"
            "<table><tr><th>token</th><th>role</th><th>region</th><th>slot</th><th>selection</th>"
            f"<th>evaluation (mean, 95% CI, n)</th></tr>{rows}</table>")


def _delimiter_section(d: dict) -> str:
    """Notes on delimiter tokens: their share of the note recovery against their share of the
    slots, and the mean single-slot recovery on each kind of slot."""
    dl = d.get("delimiters")
    if not dl:
        return ""
    def cell(x):
        return _fmt(x)
    return ("<h2>Notes on delimiter tokens?</h2><p>The paper finds notes on delimiters (punctuation, line ends), the "
            "decision cue and template tails. Over the slots after the field on evaluation pairs (a delimiter is a "
            "token of punctuation and whitespace only), per pair:</p><table><tr><th>measure</th>"
            "<th>mean, 95% CI, n pairs</th></tr>"
            f"<tr><td>share of the positive single-slot recovery on delimiters</td><td>{cell(dl['mass_share'])}</td></tr>"
            f"<tr><td>share of the slots that are delimiters</td><td>{cell(dl['slot_share'])}</td></tr>"
            f"<tr><td>recovery share minus slot share (paired)</td><td>{cell(dl['excess'])}</td></tr>"
            f"<tr><td>mean recovery of one delimiter slot ({dl['n_delimiter_slots']} slots)</td>"
            f"<td>{cell(dl['delimiter_mean'])}</td></tr>"
            f"<tr><td>mean recovery of one other slot ({dl['n_other_slots']} slots)</td>"
            f"<td>{cell(dl['other_mean'])}</td></tr></table>"
            f"<p><b>Does {html.escape(d['model'])} show notes on delimiter tokens here? "
            f"{html.escape(dl['finding'])}.</b></p>")


def _write_section(d: dict) -> str:
    w = d.get("write")
    if not w or "per_read_layer" not in w:
        return ""
    rows = "".join(f"<tr><td>L{r['layer']}</td><td>{', '.join(f'h{h}' for h in r['heads']) or '-'}</td>"
                   f"<td>{_fmt(r['attn_share'])}</td><td>{_fmt(r['mlp_share'])}</td></tr>" for r in w["per_read_layer"])
    return ("<h2>Who writes the notes, where they are read</h2><p>A read head at layer l attends to K and V made "
            "from resid_pre of layer l at the note slots. The NEW - OLD delta of that residual at the slots after the "
            "field is split exactly into the attention and MLP outputs of the layers below l (projections on the "
            f"delta; they sum to 1). Read layers: {html.escape(w['layers_chosen'])}.</p><table><tr><th>read layer</th>"
            "<th>read heads</th><th>attention share</th><th>MLP share</th></tr>"
            f"{rows}</table>")


def _heads_table(d: dict, k: int = 12) -> str:
    if "read_heads" not in d:
        return f"<h2>Read heads</h2><p>{html.escape(_few(d, 'read_heads'))}</p>"
    rows = "".join(f"<tr><td>L{h['layer']}.h{h['head']}</td><td>{h['dla_selection']:.3f}</td>"
                   f"<td>{h['mean']:.3f} [{h['ci'][0]:.3f}, {h['ci'][1]:.3f}]</td></tr>" for h in d["read_heads"][:k])
    return ("<h2>Read heads</h2><p>Heads ranked by DLA on selection pairs; recovery of patching one head's "
            "decision-step output on evaluation pairs.</p><table><tr><th>head</th>"
            f"<th>DLA (selection, n={d['n_selection']})</th><th>recovery (evaluation, mean, 95% CI, "
            f"n={d['n_evaluation']})</th></tr>{rows}</table>")


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

    prov = (d.get("provenance") or {}).get("summary", "weights' origin not recorded")
    meta = (f"seed {d['seed']} · {d.get('dtype', 'float32')} · weights: {html.escape(prov)} · notekv "
            f"{d.get('notekv_version', '?')} · model fingerprint "
            f"{html.escape(str(d.get('fingerprint', '?')))} · {d.get('seconds', 0):.0f} s")
    skipped = d.get("skipped_values") or []
    skip = (f"<p>Skipped values ({len(skipped)}): " + "; ".join(html.escape(s["reason"]) for s in skipped) + "</p>"
            if skipped else "")
    circuit = {k: v for k, v in figs.items() if k in graph_stage.FIGURES}  # drawn inside their own section
    parts = [f"<figure>{fig.to_html(full_html=False, include_plotlyjs=False)}<figcaption>{html.escape(cap)}"
             "</figcaption></figure>" for name, (fig, cap) in figs.items() if name not in circuit]
    body = ""
    if "recovery" in d:
        body = (_summary_table(d) + _too_few_section(d) + _notes_table(d) + _delimiter_section(d) + _example(d)
                + "".join(parts[:2]) + _heads_table(d) + _write_section(d) + "".join(parts[2:])
                + graph_stage.section(d, circuit))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>notekv circuit report</title>"
            f"<script>{plotly.offline.get_plotlyjs()}</script>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;padding:4px}"
            "table{border-collapse:collapse}figcaption{color:#444;font-size:13px;margin-bottom:24px}</style>"
            "</head><body>"
            f"<h1>{html.escape(d['model'])} / {html.escape(d['scenario'])}</h1><p>{html.escape(d['verdict'])}</p>"
            f"<p style='color:#666'>{meta}</p>{skip}{body}"
            f"<p style='color:#666'>Method: {html.escape(d.get('citation', ''))}.</p></body></html>")
