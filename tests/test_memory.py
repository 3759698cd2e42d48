"""Long contexts with bounded memory: batched steps over a shared cache are cut by bytes,
not by a fixed row count, and a scenario's prompt can be lengthened to N tokens."""

from __future__ import annotations


import pytest
import torch

import notekv as nk
from circuits import discover, scenarios, sweeps
from circuits.pairstate import MAX_ROWS, decide, prefill_pair, rows_per_chunk
from circuits.report import CircuitReport
from notekv.kv import cache as kv_cache
from tests.conftest import tiny_model

LONG = 400  # tokens of the lengthened tiny prompts (the tiny tokenizer is byte-level)


def _fake_cache(slots: int, dtype=torch.float32, layers: int = 30, heads: int = 3, dim: int = 64) -> nk.KVCache:
    """A cache of SmolLM2's shape without its memory (an expanded zero)."""
    kv = torch.zeros((), dtype=dtype).expand(layers, 1, heads, slots, dim)
    return nk.KVCache(kv, kv, torch.arange(slots), torch.zeros(slots, dtype=torch.int64), ("",) * slots, {}, (), 8192)


def test_rows_per_chunk_follow_the_byte_budget_not_a_row_count():
    long = _fake_cache(8192)
    assert long.row_bytes == 30 * 3 * 8192 * 64 * 4 * 2  # all layers, K and V, fp32
    assert rows_per_chunk(long, budget=1 << 30) == 2  # 377 MB a row: two rows in 1 GiB
    assert rows_per_chunk(_fake_cache(8192, torch.bfloat16), budget=1 << 30) == 5
    assert rows_per_chunk(long, budget=1) == 1  # never zero
    assert rows_per_chunk(long) == (1 << 30) // long.row_bytes  # the module default is 1 GiB
    assert rows_per_chunk(_fake_cache(100)) == MAX_ROWS  # short contexts keep the battery's batch
    assert rows_per_chunk(_fake_cache(100), most=None) == (1 << 30) // _fake_cache(100).row_bytes
    with pytest.raises(nk.InputError, match="budget"):
        long.rows_within(0)


def _long_state(model, sc):
    return prefill_pair(model, sc.fit(model, LONG, 0).pair(model, 0))


@pytest.mark.parametrize("method", ["hooks", "lean"])
def test_decide_holds_at_most_the_budget_of_mixed_caches_and_matches_one_batch(tiny_scenario, monkeypatch, method):
    """The runner's steps hold at most ``budget`` bytes of per-row cache copies: a whole cache
    per row on the hooked path, one layer's mixed K/V (and its appended copy) per row on the
    lean path; the numbers do not depend on the chunking."""
    import notekv.runner as runner

    model = tiny_model("llama")
    st = _long_state(model, tiny_scenario)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(60, st.old.n_layers, st.n_ctx, generator=g) < 0.3
    budget = 3 * st.old.row_bytes + 1
    held = []  # bytes of per-row copies one step holds at once
    real_run, real_lean = model.run, runner._lean_rows

    def run_spy(ids, *, past=None, **kw):
        if past is not None and kw.get("interventions"):
            held.append(past.keys.shape[1] * st.old.row_bytes)
        return real_run(ids, past=past, **kw)

    def lean_spy(m, ids, past, mix, rows):
        held.append(len(rows) * 2 * st.old.row_bytes // st.old.n_layers)
        return real_lean(m, ids, past, mix, rows)

    monkeypatch.setattr(model, "run", run_spy)
    monkeypatch.setattr(runner, "_lean_rows", lean_spy)
    small = decide(model, st, masks, budget=budget, method=method)
    steps = 20 if method == "hooks" else -(-60 // min(MAX_ROWS, budget // (2 * st.old.row_bytes // st.old.n_layers)))
    assert len(held) == steps and max(held) <= budget  # memory independent of the number of rows
    held.clear()
    whole = decide(model, st, masks, budget=1 << 40, method=method)
    assert len(held) == 2  # the row cap (MAX_ROWS), not the budget
    assert torch.allclose(small, whole, atol=1e-5, rtol=0), (small - whole).abs().max()  # logits
    held.clear()
    monkeypatch.setattr(kv_cache, "KV_BUDGET", budget)  # the module constant is the default budget
    assert torch.allclose(decide(model, st, masks, method=method), whole, atol=1e-5, rtol=0)
    assert len(held) == steps
    other = decide(model, st, masks, method="lean" if method == "hooks" else "hooks")
    assert torch.allclose(other, whole, atol=1e-5, rtol=0)  # the two paths agree


def test_every_batched_step_over_a_shared_cache_is_bounded_and_unchanged(tiny_scenario, monkeypatch):
    """Head patching, activation patching, direction patching and the KV patch sweep give the
    same numbers when each step may hold only one row's copy of the cache (compared in logits:
    the random tiny model's swing is small, so recoveries magnify float noise)."""
    model = tiny_model("llama")
    st = _long_state(model, tiny_scenario)
    p = st.pair
    heads = [(l, h) for l in range(model.spec.n_layers) for h in range(model.spec.n_heads)][:6]
    dirs = torch.nn.functional.normalize(torch.randn(4, model.spec.d_model, generator=torch.Generator().manual_seed(1)),
                                         dim=1)

    def battery():
        return {"heads": discover.head_patch(model, st, heads, (2, 4)),
                "act": sweeps.activation_patching(model, st, heatmap_site="attn_out"),
                "dir": discover.direction_patch(model, st, 1, 2, dirs),
                "sweep": nk.patch_sweep(model, list(p.old_ids), list(p.new_ids), answers=(p.good, p.bad), site="kv",
                                        slots=list(range(st.n_ctx - 6, st.n_ctx)), block=48,
                                        progress=False).values.flatten().tolist()}

    whole = battery()
    batches = []
    real = model.run

    def spy(inputs, *, past=None, **kw):
        if past is not None and hasattr(inputs, "shape") and inputs.shape[0] > 1:
            batches.append(inputs.shape[0])
        return real(inputs, past=past, **kw)

    monkeypatch.setattr(kv_cache, "KV_BUDGET", 1)  # one row per step
    monkeypatch.setattr(model, "run", spy)
    small = battery()
    assert batches == []  # no batched step over a shared cache was left whole
    for part in ("heads", "act", "dir"):  # recoveries: back to logits
        diff = torch.tensor(_numbers(small[part])) - torch.tensor(_numbers(whole[part]))
        assert float(diff.abs().max()) * abs(st.swing) <= 1e-5, part
    assert torch.allclose(torch.tensor(small["sweep"]), torch.tensor(whole["sweep"]), atol=1e-5, rtol=0)


def _numbers(x) -> list[float]:
    """Every number in nested dicts and lists, in a fixed order."""
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _numbers(x[k])]
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _numbers(item)]
    return [float(x)]


@pytest.mark.parametrize("interventions", [
    lambda new: [nk.KVPatch(new, at=nk.PerRow([nk.Pos(5), nk.Pos()]), layers=[0])],
    lambda new: [nk.Collect("L1.kv.k"), nk.Collect("L0.attn.v")]], ids=["kvpatch", "collect"])
def test_a_hooked_step_over_a_cache_frees_it_without_the_garbage_collector(interventions):
    """Hooks on cache sites leave no reference cycle: the batch's cache (every row's copy) is
    freed as soon as the Run is, not whenever the garbage collector runs."""
    import gc
    import weakref

    model = tiny_model("llama")
    old = model.run("order_status: shipped. Refund", logits="last").kv
    new = model.run("order_status: stopped. Refund", logits="last").kv
    gc.collect()
    gc.disable()
    try:
        run = model.run(torch.tensor([[7], [7]]), past=old.expand(2), interventions=interventions(new), logits="last")
        ref = weakref.ref(run.hf_cache)
        del run
        assert ref() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------- long prompts
def test_context_tokens_adds_examples_before_the_field(tiny_scenario):
    model = tiny_model("llama")
    base = tiny_scenario.pairs(model, 3)
    longer = tiny_scenario.pairs(model, 3, context_tokens=LONG)
    example = max(len(model.tokenize(tiny_scenario.example.replace("{value}", v))) for v in ("good", "bad!"))
    for b, p in zip(base, longer):
        assert LONG - example - 8 < p.n <= LONG  # the most examples that fit
        assert len(p.old_ids) == len(p.new_ids) and set(p.diff_slots) <= set(p.span_slots)
        tail = b.n - min(b.span_slots)  # the field, the downstream and the decision: the scenario's own
        assert p.tokens[-tail:] == b.tokens[-tail:] and p.regions[-tail:] == b.regions[-tail:]
        assert p.old.count(" go -> ") > b.old.count(" go -> ")
    assert tiny_scenario.fit(model, LONG).shots > tiny_scenario.shots
    assert tiny_scenario.fit(model, 60).shots < tiny_scenario.shots  # a short context keeps fewer


def test_context_tokens_are_refused_above_the_context_and_below_the_bare_prompt(tiny_scenario):
    model = tiny_model("llama")
    with pytest.raises(nk.InputError, match=r"context_tokens=8193 is above tiny-llama's context of 8192"):
        tiny_scenario.pairs(model, 1, context_tokens=8193)
    with pytest.raises(nk.InputError, match=r"context_tokens=10: .* without any example"):
        tiny_scenario.pairs(model, 1, context_tokens=10)
    with pytest.raises(nk.InputError, match="context_tokens"):
        tiny_scenario.pairs(model, 1, context_tokens=0)


def test_report_at_a_context_length_on_tiny(tiny_scenario, tmp_path, monkeypatch):
    """Every stage runs on the lengthened prompts (the swing floor is lifted: a random tiny
    model barely moves its decision; this checks the machinery, not a finding)."""
    import circuits.report as report
    from test_circuits import check_stages_ran

    monkeypatch.setattr(report, "MIN_SWING", 0.0)
    model = tiny_model("llama")
    seen = []
    real = scenarios.Scenario.pairs

    def pairs(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.extend(out)
        return out

    monkeypatch.setattr(scenarios.Scenario, "pairs", pairs)
    rep = CircuitReport.build(model, str(tmp_path / "tiny_gate.toml"), pairs=12, act_pairs=2, heatmap_pairs=1,
                              screen="swing", context_tokens=LONG, progress=False)
    assert rep.data["context_tokens"] == LONG and rep.data["n_pairs"] == 12
    check_stages_ran(rep.data, model.spec.n_layers)
    assert all(LONG - 40 < p.n <= LONG for p in seen)
    with pytest.raises(nk.InputError, match="context_tokens"):
        CircuitReport.build(model, str(tmp_path / "tiny_gate.toml"), pairs=2, context_tokens=10 ** 5, progress=False)


@pytest.mark.parametrize("value,message", [("0", "--context-tokens: 0 is below the minimum 1"),
                                           ("many", "--context-tokens: 'many' is not a whole number")])
def test_cli_context_tokens_is_a_positive_whole_number(value, message, capsys, monkeypatch):
    from notekv_cli import main

    monkeypatch.setattr(nk, "load", lambda *a, **k: pytest.fail("a model was loaded before the arguments were checked"))
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--context-tokens", value])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_cli_context_tokens_above_the_model_is_one_line(tiny_scenario, tmp_path, capsys, monkeypatch):
    from notekv_cli import main

    monkeypatch.setattr(nk, "load", lambda *a, **k: tiny_model("llama"))
    code = main(["report", "--scenario", str(tmp_path / "tiny_gate.toml"), "--out", str(tmp_path / "out"),
                 "--pairs", "2", "--context-tokens", "9000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("notekv report: context_tokens=9000 is above tiny-llama's context of 8192 positions"), err
