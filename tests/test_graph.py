"""The notes graph (notekv.graph): edges, exact direct path patching, attribution (EAP, key
fix, EAP-IG), faithfulness of ranked circuits, dispersion and the public API, on tiny
models with planted circuits, then on the two bundled models."""

from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import notekv as nk
from notekv.graph import CircuitGraph, circuit, decision
from notekv.graph import dispersion as disp
from notekv.graph.edges import EdgeIndex, attribute, evaluate, exact_edges, full_circuit
from notekv.graph.readout import head_z, readout

from conftest import prefix_caches, random_pair

GOOD, BAD = 40, 41


def _mha():
    """A tiny llama whose KV heads are its query heads (no GQA): one head reads one KV head."""
    return nk.tiny("llama", num_key_value_heads=4)


def _edge(idx: EdgeIndex, kind: str, l: int, a: int, b: int | None = None) -> int:
    if kind == "fc":
        return l * idx.C + a
    if kind == "ch":
        return idx.n_fc + (l * idx.C + a) * idx.H + b
    return idx.n_fc + idx.n_ch + l * idx.H + a


# ---------------------------------------------------------------------- the readout and exact paths
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])
def test_readout_reproduces_old_and_one_layer_new(arch):
    """No edge at NEW gives OLD's decision exactly; on a one-layer model every edge at NEW is
    NEW's decision (nothing below the heads changes, so frozen queries are exact)."""
    m = nk.tiny(arch)
    old, new = random_pair()
    d = decision(m, *prefix_caches(m, old, new), old[-1], GOOD, BAD, 8)
    z0 = head_z(d, torch.zeros(1, d.n_layers, d.n_heads, d.n_cells, dtype=torch.bool))
    assert torch.allclose(z0[0], d.z_old, atol=1e-5)
    assert float(readout(m, d, z0)[0]) == pytest.approx(d.s_old, abs=1e-5)
    one = nk.tiny(arch, num_hidden_layers=1, **({"layer_types": ["full_attention"]} if arch == "gemma3_text" else {}))
    co, cn = prefix_caches(one, old, new)
    d1 = decision(one, co, cn, old[-1], GOOD, BAD, 8)
    lg = one.run(torch.tensor([[new[-1]]]), past=cn, logits="last").logits[0, -1]
    assert float(readout(one, d1, full_circuit(d1)[None])[0]) == pytest.approx(float(lg[GOOD] - lg[BAD]), abs=1e-4)


def test_exact_path_patching_matches_hand_built_reference():
    """Each edge kind's exact value equals a hooked forward built by hand: NEW's K/V patched
    into the one KV head (= query head here) / layer it names, every other head's decision
    output frozen at OLD's."""
    m = _mha()
    old, new = random_pair(edit=(6, 7))
    co, cn = prefix_caches(m, old, new)
    S, first = len(co), 6
    d = decision(m, co, cn, old[-1], GOOD, BAD, first)
    idx = EdgeIndex(d.n_layers, d.n_cells, d.n_heads)
    L, H = d.n_layers, d.n_heads
    base = m.run(torch.tensor([[old[-1]]]), past=co, collect=[f"L{l}.attn.z" for l in range(L)], logits="last")

    def reference(layer, heads, slots):
        frozen = [nk.Patch(f"L{l}.attn.z.h{h}", base, at=nk.Pos(S)) for l in range(L) for h in range(H)
                  if not (l == layer and h in heads)]
        patch = nk.KVPatch(cn, at=nk.Pos(slots), layers=[layer], heads=tuple(heads))
        lg = m.run(torch.tensor([[old[-1]]]), past=co, interventions=[patch, *frozen], logits="last").logits[0, -1]
        return float(lg[GOOD] - lg[BAD]) - d.s_old

    cases = [(("ch", 1, 3, 2), (1, [2], [first + 3])), (("ch", 2, 0, 1), (2, [1], [first])),
             (("fc", 1, 5), (1, list(range(H)), [first + 5])), (("hl", 1, 3), (1, [3], list(range(first, S))))]
    exact = exact_edges(m, d, [_edge(idx, *e) for e, _ in cases])
    for (e, ref), got in zip(cases, exact.tolist()):
        want = reference(*ref)
        assert abs(want) > 1e-4, e
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5), e


# ---------------------------------------------------------------------- attribution
def test_attribution_is_exact_in_the_linear_regime_and_ig_is_complete():
    """A patch 1% of the way to NEW is linear: every method's score of every edge equals its
    exact value. At full size, IG's cell -> head scores sum to the whole graph's effect."""
    m = nk.tiny("llama", dtype=torch.float64)
    old, new = random_pair(edit=(8, 9))
    co, cn = prefix_caches(m, old, new)
    near = replace(cn, keys=co.keys + 1e-2 * (cn.keys - co.keys), values=co.values + 1e-2 * (cn.values - co.values),
                   origin_keys=None, origin_positions=None)
    d = decision(m, co, near, old[-1], GOOD, BAD, 8)
    idx = EdgeIndex(d.n_layers, d.n_cells, d.n_heads)
    exact = exact_edges(m, d, list(range(idx.n)))
    scale = float(exact.abs().max())
    assert scale > 1e-6
    for name, sc in attribute(m, d, steps=4).items():
        assert float((sc.flat() - exact).abs().max()) < 0.02 * scale, name
    d = decision(m, co, cn, old[-1], GOOD, BAD, 8)
    ig = attribute(m, d, steps=32)["ig"]
    total = float(readout(m, d, full_circuit(d)[None])[0]) - d.s_old
    assert abs(total) > 1e-2
    assert float(ig.ch.sum()) == pytest.approx(total, rel=0.02)
    assert torch.allclose(ig.fc, ig.ch.sum(-1))


def test_ig_beats_plain_attribution_where_attention_saturates():
    """OLD's decision query (one head) attends almost only to a planted key; NEW has the
    ordinary key there. The gradient at OLD is ~0 through the saturated softmax, so plain EAP
    misses the edge; IG along OLD -> NEW, which passes through unsaturated attention, finds it."""
    m = _mha()
    old, _ = random_pair()
    co, _ = prefix_caches(m, old, old)
    l, p, h = m.spec.n_layers - 1, 10, 0
    run = m.run(torch.tensor([[old[-1]]]), past=co, collect=[f"L{l}.attn.q"], logits="last")
    q = run[f"L{l}.attn.q"][0, h, -1]
    keys = co.keys.clone()
    keys[l, 0, h, p] = q / q.norm() * (40.0 / float(q.norm()) / m.spec.head_dim ** -0.5)
    saturated = replace(co, keys=keys, origin_keys=None, origin_positions=None)
    first = p - 2
    d = decision(m, saturated, co, old[-1], GOOD, BAD, first)
    pattern = m.run(torch.tensor([[old[-1]]]), past=saturated, collect=[f"L{l}.attn.pattern"], logits="last")
    assert float(pattern[f"L{l}.attn.pattern"][0, h, -1, p]) > 0.99
    idx = EdgeIndex(d.n_layers, d.n_cells, d.n_heads)
    e = _edge(idx, "ch", l, p - first, h)
    exact = float(exact_edges(m, d, [e])[0])
    sc = attribute(m, d, steps=32)
    ig, plain = float(sc["ig"].flat()[e]), float(sc["plain"].flat()[e])
    assert abs(exact) > 0.02
    assert abs(plain) < 0.2 * abs(exact)
    assert abs(ig - exact) < 0.25 * abs(exact)


# ---------------------------------------------------------------------- a planted circuit
def _planted():
    """OLD's cache and a NEW one that differs at one note cell only: at layer 1, slot 14, KV
    head 2, NEW's key draws head 2's decision query and its value pushes that head's output
    along the readout's gradient. The circuit is field -> (1, 14) -> head (1, 2) -> logit."""
    m = _mha()
    old, _ = random_pair(n=20)
    co, _ = prefix_caches(m, old, old)
    l, q, h, first = 1, 14, 2, 8
    d = decision(m, co, co, old[-1], GOOD, BAD, first)
    from notekv.graph.readout import readout_grad

    _, gz = readout_grad(m, d, d.z_old[None])
    keys, values = co.keys.clone(), co.values.clone()
    query = d.q[l, h]
    keys[l, 0, h, q] += query / query.norm() * (4.0 / float(query.norm()) / m.spec.head_dim ** -0.5)
    values[l, 0, h, q] += 6.0 * gz[0, l, h] / gz[0, l, h].norm()
    new = replace(co, keys=keys, values=values, origin_keys=None, origin_positions=None)
    return m, decision(m, co, new, old[-1], GOOD, BAD, first), (l, q - first, h)


def test_planted_circuit_is_recovered_and_its_complement_is_not():
    m, d, (l, c, h) = _planted()
    idx = EdgeIndex(d.n_layers, d.n_cells, d.n_heads)
    truth = {_edge(idx, "fc", l, c), _edge(idx, "ch", l, c, h), _edge(idx, "hl", l, h)}
    total = float(readout(m, d, full_circuit(d)[None])[0]) - d.s_old
    assert total > 1.0  # the planted path moves the decision
    for name, sc in attribute(m, d, steps=8).items():
        top = torch.argsort(-sc.flat().abs())[:3].tolist()
        assert set(top) == truth, name

    def masks(rows):
        out = torch.zeros(len(rows), idx.n, dtype=torch.bool)
        out[:, list(truth)] = True
        out[1] = ~out[1]  # row 1: the complement
        return out
    s = evaluate(m, d, 2, masks) - d.s_old
    assert float(s[0]) == pytest.approx(total, rel=1e-4)
    assert abs(float(s[1])) < 1e-3 * total


# ---------------------------------------------------------------------- the public API
def _pairs(n=8, edit=(8,)):
    olds, news = zip(*[random_pair(seed=s, edit=edit) for s in range(n)])
    return list(olds), list(news)


def test_circuit_graph_end_to_end_with_real_intervals():
    m = nk.tiny("llama")
    olds, news = _pairs(8)
    olds.append(olds[0])  # a duplicate pair counts once
    news.append(news[0])
    g = circuit(m, olds, news, answers=(GOOD, BAD), min_swing=0, check=32, progress=False)
    assert g.meta["n_distinct"] == 8 and len(g.pairs) == 8
    assert g.held_out and not set(g.selection) & set(g.evaluation)
    assert sorted(g.selection + g.evaluation) == list(range(8))
    ag = g.agreement()
    assert ag["n_pairs"] == 8 and all(n == 32 for n in ag["n_edges_per_pair"])
    assert ag["ig"]["spearman"]["mean"] > 0.8
    f = g.faithfulness(n_random=3, progress=False)
    n_ev = len(g.evaluation)
    assert f["n"] == n_ev and f["auc_top"]["n"] == n_ev
    lo, hi = f["auc_top"]["ci"]
    assert lo < f["auc_top"]["mean"] < hi  # a bootstrap over distinct pairs, not a zero-width interval
    assert f["top"][-1]["mean"] == pytest.approx(f["full_graph"]["mean"], abs=1e-6)  # every ranked edge = the graph
    assert f["auc_top"]["mean"] > f["auc_random"]["mean"]
    assert f["sizes"][0] == 1 and f["sizes"][-1] == f["n_ranked"]
    assert {t["threshold"] for t in f["minimal"]} == {0.8, 0.9}
    d = g.dispersion()
    assert d["n"] == n_ev and d["shows"] in (True, False)
    assert "n=" in d["verdict"] and str(n_ev) in d["verdict"]
    fig = g.figure(edges=12)
    assert isinstance(fig, go.Figure)
    names = [t for tr in fig.data if tr.mode == "markers+text" for t in tr.text]
    assert any(t.startswith("L") and ".H" in t for t in names) and any("field" in t for t in names)
    back = CircuitGraph.load(g.to_json())
    assert back.faithfulness(n_random=3) == f  # the stored result, without the model
    assert back.ranking() == g.ranking()
    with pytest.raises(nk.InputError, match="without a model"):
        back.faithfulness(n_random=4)


def test_one_pair_is_both_selection_and_evaluation():
    m = nk.tiny("llama")
    old, new = random_pair()
    g = circuit(m, old, new, answers=(GOOD, BAD), min_swing=0, check=8, progress=False)
    assert g.selection == g.evaluation == [0] and not g.held_out
    f = g.faithfulness(n_random=2, progress=False)
    assert f["held_out"] is False and f["n"] == 1
    assert g.dispersion()["shows"] is None  # n = 1: too few pairs to tell


def test_bad_input_is_refused_with_the_fix():
    m = nk.tiny("llama")
    old, new = random_pair()
    with pytest.raises(nk.InputError, match="not one"):
        circuit(m, "ab: x.", "ab: y.", answers=("yes", "n"), min_swing=0)
    with pytest.raises(nk.InputError, match="equal token length"):
        circuit(m, "ab: x.", "ab: xy.", answers=("y", "n"), min_swing=0)
    with pytest.raises(nk.InputError, match="same tokens"):
        circuit(m, old, old, answers=(GOOD, BAD))
    with pytest.raises(nk.InputError, match="decision token"):
        circuit(m, old, old[:-1] + [old[-1] + 1], answers=(GOOD, BAD))
    with pytest.raises(nk.InputError, match="same token"):
        circuit(m, old, new, answers=(GOOD, GOOD))
    with pytest.raises(nk.InputError, match="method"):
        circuit(m, old, new, answers=(GOOD, BAD), method="atp")
    with pytest.raises(nk.InputError, match="one NEW prompt per OLD"):
        circuit(m, [old, old], [new], answers=(GOOD, BAD))
    with pytest.raises(nk.InputError, match="min_swing"):
        circuit(m, old, new, answers=(GOOD, BAD), min_swing=1e6, progress=False)
    with pytest.raises(nk.InputError, match="format"):
        CircuitGraph.load('{"format": "other"}')


# ---------------------------------------------------------------------- dispersion
def test_spread_and_verdict_are_computed_from_the_numbers():
    one, flat = disp.spread(np.array([0, 0, 5.0, 0])), disp.spread(np.ones(8))
    assert one["evenness"] == 0 and one["effective"] == pytest.approx(1) and one["top_share"] == 1
    assert flat["evenness"] == pytest.approx(1) and flat["effective"] == pytest.approx(8)
    tokens = ["a", "b", "c", ".", "d", ",", "e", "f"]
    rng = np.random.default_rng(0)

    def pair(write_even: bool):
        fc = torch.tensor(rng.uniform(0.5, 1.5, (3, 6)) if write_even else np.eye(3, 6) * 5 + 1e-3)
        hl = torch.tensor(np.eye(3, 4) * 5 + 1e-3 if write_even else rng.uniform(0.5, 1.5, (3, 4)))
        return disp.pair_dispersion(fc, hl, tokens, 2, [2])

    yes = disp.summarize([pair(True) for _ in range(6)], model="m")
    no = disp.summarize([pair(False) for _ in range(6)], model="m")
    assert yes["shows"] is True and yes["verdict"].startswith("m: shows")
    assert no["shows"] is False and "does not show" in no["verdict"] and "n=6" in no["verdict"]
    d = pair(True)["write"]
    assert d["n_note_slots"] == 5 and d["delimiter_slot_share"] == pytest.approx(2 / 5)


# ---------------------------------------------------------------------- the benchmark at toy size
def test_circuit_graph_benchmark_runs_at_toy_size(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import circuit_graph

    result = circuit_graph.main(["--toy", "--lengths", "48", "--sample", "16", "--steps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "circuit_graph-toy-cpu.json").read_text())
    (row,) = saved["rows"]
    assert row == json.loads(json.dumps(result["rows"][0]))
    assert row["exact_edges"] == 16 and row["edges"] == 3 * row["cells"] + 3 * row["cells"] * 4 + 3 * 4
    assert set(row["stages"]) == {"prefill", "decision", "attribution", "exact", "node_kv"}
    assert row["spearman"]["ig"] > 0.8


# ---------------------------------------------------------------------- real models
@pytest.mark.slow
def test_smollm2_graph_agrees_with_exact_path_patching_and_beats_random(smollm2):
    """Four distinct refund pairs: the IG edge scores rank >= 64 exactly patched edges as
    direct path patching does, and the ranked circuits (ranked on two pairs, evaluated on the
    other two) recover more of the swing than random circuits of the same sizes."""
    from circuits import scenarios

    sc, _ = scenarios.get("refund").usable(smollm2)
    ps = sc.pairs(smollm2, 4, seed=0)
    g = nk.circuit(smollm2, [list(p.old_ids) for p in ps], [list(p.new_ids) for p in ps],
                   answers=[(p.good, p.bad) for p in ps], steps=4, check=32, progress=False)
    assert len(g.pairs) == 4 and g.held_out
    ag = g.agreement()
    assert sum(ag["n_edges_per_pair"]) >= 64
    rho = ag["ig"]["spearman"]
    assert rho["n"] == 4 and rho["ci"][0] > 0.8  # measured 0.99 [0.986, 0.993] on 12 pairs
    f = g.faithfulness(n_random=2, max_size=1024, progress=False)
    assert f["n"] == 2
    assert f["auc_top"]["mean"] > f["auc_random"]["mean"]
    assert f["top"][-1]["mean"] > f["random"][-1]["mean"]
    d = g.dispersion()
    assert d["n"] == 2 and "smollm2-135m" in d["verdict"]
