"""The one batched runner: both of its paths against plain transformers forwards, and the
sweeps, exact checks and battery that run through it against each other."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import notekv as nk
from conftest import tiny_model
from notekv.attribution import exact_kv
from notekv.runner import KVMix, RowInterventions, logit_diff, rows_per_step, run_variants

PROMPT = "order_status: shipped. Refund granted or denied? Decide now"
GOOD, BAD = 5, 9


def _pair(model):
    ids = list(model.tokenize(PROMPT).ids)
    other = list(ids)
    other[3] = (other[3] + 7) % model.spec.vocab_size
    old = model.run([ids[:-1]], logits="last").kv
    new = model.run([other[:-1]], logits="last").kv
    return ids, other, old, new


def _reference(model, ids, old, new, kmask, vmask) -> float:
    """One plain forward of the decision token over a cache mixed by hand with torch.where."""
    keys = torch.where(kmask[:, None, :, :, None], new.keys, old.keys)
    values = torch.where(vmask[:, None, :, :, None], new.values, old.values)
    mixed = nk.KVCache(keys, values, old.positions, old.token_ids, old.segments, old.fingerprint, old.rope,
                       old.max_positions)
    cache = mixed.to_hf()
    logits = model.hf(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return float(logits[GOOD] - logits[BAD])


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}), ("gpt_neox", {}),
                                            ("gemma3_text", {"sliding_window": 5})])
def test_kv_mix_rows_equal_hand_mixed_caches_on_both_paths(arch, overrides):
    model = nk.tiny(arch, **overrides)
    ids, _, old, new = _pair(model)
    L, H, S = old.n_layers, old.keys.shape[2], len(old)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, L, S, generator=g) < 0.3
    cells = [(1, 4, 0), (None, 3, None), (0, 2, None), (L - 1, S - 1, H - 1)]
    metric = logit_diff(GOOD, BAD)
    for which in ("kv", "k", "v"):
        by_slots = KVMix.of_slots(new, masks, which=which)
        by_cells = KVMix.of_cells(new, cells, which=which)
        for mix in (by_slots, by_cells):
            refs = []
            for r in range(mix.n):
                km, vm = (m[0] for m in mix.masks(range(r, r + 1)))
                refs.append(_reference(model, ids, old, new, km, vm))
            refs = torch.tensor(refs, dtype=torch.float64)
            for method in ("hooks", "lean"):
                got = run_variants(model, [ids[-1]], mix, metric, past=old, method=method)
                assert torch.allclose(got, refs, atol=2e-5, rtol=0), (arch, which, method, (got - refs).abs().max())


def test_rows_in_chunks_equal_one_batch_and_the_budget_sets_the_chunks():
    model = tiny_model("llama")
    ids, _, old, new = _pair(model)
    masks = torch.rand(9, old.n_layers, len(old), generator=torch.Generator().manual_seed(1)) < 0.5
    mix = KVMix.of_slots(new, masks)
    whole = run_variants(model, [ids[-1]], mix, logit_diff(GOOD, BAD), past=old, method="hooks")
    parts = run_variants(model, [ids[-1]], mix, logit_diff(GOOD, BAD), past=old, method="hooks",
                         budget=2 * old.row_bytes)
    assert torch.allclose(whole, parts, atol=1e-6, rtol=0)
    assert rows_per_step(old, 2 * old.row_bytes) == 2 and rows_per_step(old, 2 * old.row_bytes, most=1) == 1
    per_layer = 2 * old.row_bytes // old.n_layers
    assert rows_per_step(old, 3 * per_layer, per_layer=True) == 3  # the lean path holds one layer per row


def test_row_interventions_equal_one_forward_per_row():
    model = tiny_model("qwen3")
    ids, other, _, _ = _pair(model)
    clean = model.run([other], collect=[f"L{l}.resid_pre" for l in range(model.spec.n_layers)])
    at = nk.Pos(3)

    def build(part):
        return [nk.Patch(f"L{l}.resid_pre", clean, at=nk.PerRow([at if r == l else nk.Pos() for r in part]))
                for l in part]

    got = run_variants(model, ids, RowInterventions(model.spec.n_layers, build), logit_diff(GOOD, BAD), most=1)
    for l in range(model.spec.n_layers):
        one = model.run([ids], interventions=[nk.Patch(f"L{l}.resid_pre", clean, at=at)], logits="last").logits
        assert abs(float(one[0, -1, GOOD] - one[0, -1, BAD]) - float(got[l])) < 1e-5


def test_the_sweep_exact_kv_and_the_battery_read_the_same_cells_alike():
    """One runner behind all three: a (layer, slot) cell of the KV sweep, the same cell in
    exact_kv, and a battery row patching that one cell give one number."""
    from circuits.pairstate import PairState, decide, slot_mask

    model = tiny_model("llama")
    ids, other, old, new = _pair(model)
    sweep = nk.patch_sweep(model, ids, other, answers=(GOOD, BAD), site="kv", progress=False)
    base = model.run([[ids[-1]]], past=old, logits="last").logits[0, -1]
    s_old = float(base[GOOD] - base[BAD])
    cells = [(l, q) for l in range(old.n_layers) for q in (3, 5, len(old) - 1)]
    exact = exact_kv(model, old, new, ids[-1], GOOD, BAD, cells)
    pair = type("P", (), {"old_ids": tuple(ids), "good": GOOD, "bad": BAD})()
    st = PairState(pair, old, new, s_old, 0.0)
    battery = decide(model, st, torch.stack([slot_mask(st, [q], layers=[l]) for l, q in cells]))
    for i, (l, q) in enumerate(cells):
        assert abs(float(sweep.values[l, sweep.slots.index(q)]) - s_old - float(exact[i])) < 1e-5
        assert abs(float(battery[i]) - s_old - float(exact[i])) < 1e-5


def test_the_lean_path_is_refused_where_it_does_not_apply():
    model = tiny_model("llama")
    ids, _, old, new = _pair(model)
    mix = KVMix.of_cells(new, [(0, 1, None)])
    metric = logit_diff(GOOD, BAD)
    ko = nk.Knockout(src=nk.Pos(0), dst=nk.Last())
    with pytest.raises(nk.InputError, match="shared interventions"):
        run_variants(model, [ids[-1]], mix, metric, past=old, shared=[ko], method="lean")
    moved = old.reposition(3)
    with pytest.raises(nk.InputError, match="repositioned"):
        run_variants(model, [ids[-1]], KVMix.of_cells(replace(new), [(0, 1, None)]), metric, past=moved, method="lean")
    with pytest.raises(nk.InputError, match="only KV-mix rows"):
        run_variants(model, ids, RowInterventions(1, lambda r: []), metric, method="lean")
    # "auto" takes the hooked path there, and still gives the exact number
    auto = run_variants(model, [ids[-1]], mix, metric, past=old, shared=[ko])
    hooked = run_variants(model, [ids[-1]], mix, metric, past=old, shared=[ko], method="hooks")
    assert torch.equal(auto, hooked)
    with pytest.raises(nk.CacheMismatchError):
        run_variants(nk.tiny("llama", seed=1), [ids[-1]], mix, metric, past=old)
