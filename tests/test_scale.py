"""Where researchers run: models wrapped as they are (bf16, dispatched by accelerate with CPU
and disk offload), loading options, and dtype-clean floors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import notekv as nk
from conftest import count_hooks, tiny_model

TEXT = "order_status: shipped. Refund?"
OTHER = "order_status: stopped. Refund?"
SITES = ["L0.resid_post", "L1.resid_pre", "L1.attn.k", "L2.attn.pattern", "L2.mlp_out", "logits"]


def _dispatched(tmp_path, arch: str = "llama"):
    from accelerate import dispatch_model

    base = tiny_model(arch)
    hf = copy.deepcopy(base.hf)
    layers = base.spec.layout.layers
    device_map = {base.spec.layout.embed: "cpu", f"{layers}.0": "cpu", base.spec.layout.final_norm: "cpu",
                  base.spec.layout.rotary: "cpu", base.spec.layout.unembed: "cpu"}
    device_map.update({f"{layers}.{l}": "disk" for l in range(1, base.spec.n_layers)})
    hf = dispatch_model(hf, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    return base, nk.wrap(hf, base.tokenizer, name=f"dispatched-{arch}")


def _accelerate_hooks(model) -> int:
    return sum(hasattr(m, "_hf_hook") for m in model.hf.modules())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_dispatched_model_with_disk_offload_matches_the_plain_one(arch, tmp_path):
    base, model = _dispatched(tmp_path, arch)
    assert any(p.is_meta for p in model.hf.parameters())  # weights really live off the model
    assert model.fingerprint == base.fingerprint  # the same weights, wherever they are kept
    a, b = base.run(TEXT, collect=SITES), model.run(TEXT, collect=SITES)
    for s in SITES:
        assert torch.allclose(a[s], b[s], atol=1e-6), s
    src_a, src_b = base.run(OTHER, collect=["L2.resid_pre"]), model.run(OTHER, collect=["L2.resid_pre"])
    ivs = lambda src: [nk.Patch("L2.resid_pre", src, at=nk.Pos(15)), nk.KVPatch(src, at=nk.Pos(15), layers=[1]),  # noqa: E731
                       nk.Knockout(src=nk.Range(1, 4), dst=nk.Last(), layers=[2])]
    pa, pb = base.run(TEXT, interventions=ivs(src_a)), model.run(TEXT, interventions=ivs(src_b))
    assert torch.allclose(pa.logits, pb.logits, atol=1e-6)
    sweep = nk.patch_sweep(model, TEXT, OTHER, answers=(5, 7), layers=[1], progress=False)  # lean path refused: hooks
    ref = nk.patch_sweep(base, TEXT, OTHER, answers=(5, 7), layers=[1], method="hooks", progress=False)
    assert torch.allclose(sweep.values, ref.values, atol=1e-5)


def test_dispatch_hooks_and_notekv_hooks_both_intact_after_exit_and_errors(tmp_path):
    base, model = _dispatched(tmp_path)
    accel = _accelerate_hooks(model)
    before = count_hooks(model.hf)
    plain = model.run(TEXT).logits
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(nk.Collect("L1.attn.pattern"), nk.Collect("L2.kv.k")):
            raise RuntimeError("boom")
    with pytest.raises(nk.PlanError):
        model.run(TEXT, interventions=[nk.Hook("L2.resid_pre", lambda t, hook: t[:, :1])])  # fails mid-forward
    assert _accelerate_hooks(model) == accel and count_hooks(model.hf) == before
    assert torch.equal(model.run(TEXT).logits, plain)
    with pytest.raises(nk.InputError, match="dispatched by accelerate"):
        model.to("cpu")


def test_bf16_model_keeps_its_dtype_through_every_floor():
    model = nk.tiny("llama", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    src = model.run(OTHER, collect=["L1.resid_pre"])
    run = model.run(TEXT, collect=["L1.resid_pre", "L1.attn.pattern"], interventions=[
        nk.Patch("L1.resid_pre", src, at=nk.Pos(15)), nk.Steer("L2.resid_pre", torch.ones(64)),  # fp32 vector
        nk.Ablate("L0.mlp_out", kind="mean", reference=torch.randn(2, 4, 64)),  # fp32 reference
        nk.KVPatch(src, at=nk.Pos(15), layers=[0]), nk.Knockout(src=nk.Pos(1), dst=nk.Last())])
    assert run["L1.resid_pre"].dtype == torch.bfloat16 and run.kv.keys.dtype == torch.bfloat16
    moved = run.kv.reposition(30)
    assert moved.keys.dtype == torch.bfloat16
    skill = nk.Skill.compile(model, "Refunds within 30 days.\n", name="pol")
    hf = nk.compose(model, "Customer.\n", [skill], "Refund?", engine="hf")
    lean = nk.compose(model, "Customer.\n", [skill], "Refund?", engine="lean")
    assert hf.cache.keys.dtype == lean.cache.keys.dtype == torch.bfloat16
    assert int(hf.logits[0, -1].argmax()) == int(lean.logits[0, -1].argmax())
    sweep = nk.patch_sweep(model, TEXT, OTHER, answers=(5, 7), site="kv", layers=[0], progress=False)
    assert torch.isfinite(sweep.values).all()


def test_casting_a_model_changes_its_fingerprint():
    model = nk.tiny("llama")
    cache = model.run(TEXT).kv
    model.to(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(nk.CacheMismatchError):
        model.run(" more", past=cache)
    model.to(dtype=torch.float32)  # bf16-rounded weights: still not the computation the cache came from
    with pytest.raises(nk.CacheMismatchError):
        model.run(" more", past=cache)


def test_load_options_are_checked_before_loading():
    with pytest.raises(nk.InputError, match="not both"):
        nk.load("smollm2-135m", device="cpu", device_map="auto")
    with pytest.raises(nk.InputError, match="dtype"):
        nk.load("smollm2-135m", dtype="bf16")
    with pytest.raises(nk.InputError, match="attn_implementation"):
        nk.load("smollm2-135m", attn_implementation="fast")
    if not torch.cuda.is_available():
        with pytest.raises(nk.InputError, match="CUDA is not available"):
            nk.load("smollm2-135m", device="cuda")
    with pytest.raises(nk.InputError, match="transformers causal LM"):
        nk.wrap(torch.nn.Linear(2, 2), None)


@pytest.mark.slow
def test_load_bf16_and_device_map_on_the_bundled_model(smollm2, tmp_path):
    bf16 = nk.load("smollm2-135m", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.fingerprint != smollm2.fingerprint
    a = smollm2.run(TEXT, logits="last").logits[0, -1]
    b = bf16.run(TEXT, logits="last").logits[0, -1].float()
    assert torch.topk(a, 5).indices.tolist()[:1] == torch.topk(b, 5).indices.tolist()[:1]
    mapped = nk.load("smollm2-135m", device_map={"": "cpu"}, attn_implementation="eager")
    assert mapped.hf.config._attn_implementation == "eager"
    assert torch.allclose(mapped.run(TEXT, logits="last").logits[0, -1], a, atol=1e-4)


# ---------------------------------------------------------------- bf16 against fp32 on SmolLM2
BF16_PAIRS = 48  # distinct refund pairs, prefilled in both dtypes
REGIONS = ("field_only", "downstream", "after_field")


@pytest.fixture(scope="module")
def bf16_vs_fp32(smollm2, smollm2_bf16):
    """The report's screening and KV-battery regions on the same pairs in fp32 and bf16: per
    pair both PairStates, whether each dtype's report would use it, and its battery there."""
    from circuits import scenarios, sweeps
    from circuits.pairstate import prefill_pair
    from circuits.report import MIN_SWING

    sc, _ = scenarios.get("refund").usable(smollm2)
    pairs = list({(p.old_ids, p.new_ids): p for p in sc.pairs(smollm2, BF16_PAIRS)}.values())
    rows = []
    for p in pairs:
        states = (prefill_pair(smollm2, p), prefill_pair(smollm2_bf16, p))
        used = [st.flips and abs(st.swing) >= MIN_SWING for st in states]
        kv = [sweeps.kv_battery(m, st) if u else None for m, st, u in zip((smollm2, smollm2_bf16), states, used)]
        rows.append({"pair": p, "states": states, "used": used, "kv": kv})
    return rows


@pytest.mark.slow
def test_bf16_report_recovery_means_match_fp32(bf16_vs_fp32):
    """Each dtype's report (its own usable pairs) recovers the same share of the swing by region."""
    rows = bf16_vs_fp32
    assert len(rows) == BF16_PAIRS
    n_used = [sum(r["used"][i] for r in rows) for i in (0, 1)]
    assert min(n_used) >= 20, n_used
    for region in REGIONS:
        fp32, bf16 = (sum(r["kv"][i][region] for r in rows if r["used"][i]) / n_used[i] for i in (0, 1))
        assert abs(bf16 - fp32) <= 0.05, (region, fp32, bf16, n_used)


@pytest.mark.slow
def test_bf16_flip_decisions_match_fp32_where_bf16_can_resolve_them(bf16_vs_fp32, smollm2_bf16):
    """The same flip decision on every pair, except where an fp32 decision margin is below the
    spacing of bf16 numbers at the decision's logits (bf16 then rounds ``s`` to a tie or
    either sign: those pairs are listed, not hidden)."""
    unresolved, same = [], 0
    for r in bf16_vs_fp32:
        a, b = r["states"]
        if a.flips == b.flips:
            same += 1
            continue
        logits = smollm2_bf16.run(list(r["pair"].old_ids), logits="last").logits[0, -1].float()
        spacing = 2.0 ** (math.floor(math.log2(float(logits.abs().max()))) - 7)  # bf16: 8 significant bits
        margin = min(abs(a.s_old), abs(a.s_new))
        assert margin < spacing, (r["pair"].variant, a.s_old, a.s_new, b.s_old, b.s_new, spacing)
        unresolved.append(r["pair"].variant)
    assert same >= 30, (same, unresolved)


# ---------------------------------------------------------------- edits and composition in bf16
EDIT_CASES = 8  # candidate cases, refund and access in turn
EDIT_MODES = ["in_place", "erratum", "field+erratum", "hoist", "selective@4:attention:faithful"]


@pytest.fixture(scope="module")
def edits_in_both_dtypes(smollm2, smollm2_bf16):
    """``eval-edits``' per-case records of the same cases in fp32 and in bf16."""
    from evals import edit_cases, edits

    cases = [edit_cases.make_case(("refund", "access")[i % 2], i // 2) for i in range(EDIT_CASES)]
    return [[edits.run_case(m, c, EDIT_MODES, min_swing=0.25) for m in (smollm2, smollm2_bf16)] for c in cases]


def _bf16_error(a: dict, b: dict) -> float:
    """The larger bf16-vs-fp32 error of a case's two reference scores (the stale prefill and the
    full recompute): the scale by which bf16 moves a score on this case."""
    return max(abs(a["s_old"] - b["s_old"]), abs(a["s_new"] - b["s_new"]))


@pytest.mark.slow
def test_bf16_edit_decisions_match_fp32_where_bf16_can_resolve_them(edits_in_both_dtypes):
    """Every mode's and control's calibrated decision is the same in bf16 as in fp32, except where
    fp32's score lies closer to the decision boundary (midway between the two full recomputes'
    scores) than bf16 can move it: twice the case's reference error (once for the state's own
    score, once for the midpoint). Such decisions are counted, not hidden."""
    from evals.edits import CONTROLS

    same, unresolved = 0, []
    for a, b in edits_in_both_dtypes:
        err = _bf16_error(a, b)
        if a["valid"] != b["valid"]:  # the screen: only where the swing is within bf16's reach of min_swing
            assert abs(a["swing"] - 0.25) < 2 * err, (a["gate"], a["index"], a["swing"], b["swing"], err)
            continue
        if not a["valid"]:
            continue
        mid = (a["s_old"] + a["s_new"]) / 2
        for name in EDIT_MODES + list(CONTROLS):
            x = a["modes"].get(name) or a["controls"][name]
            y = b["modes"].get(name) or b["controls"][name]
            assert ("error" in x) == ("error" in y), (name, x, y)
            if "error" in x:
                continue
            if x["positive"] == y["positive"]:
                same += 1
                continue
            assert abs(x["s"] - mid) < 2 * err, (a["gate"], a["index"], name, x["s"], y["s"], mid, err)
            unresolved.append((a["gate"], a["index"], name))
    assert same >= 30 and same >= 0.9 * (same + len(unresolved)), (same, unresolved)


COMPOSE_PAIRS = 6  # prefix x skill pairs of the built-in composition suite


@pytest.mark.slow
def test_bf16_composition_decisions_match_fp32_where_bf16_can_resolve_them(smollm2, smollm2_bf16):
    """Each compile mode's composed decision (the sign of the Yes-No margin) and the incremental
    floor's are the same in bf16 as in fp32, and so is whether it agrees with the full
    recompute's, except where an fp32 margin they rest on is within twice the pair's
    full-recompute bf16 error of zero (then bf16 can round it either way; counted, not hidden)."""
    from evals import compose as ce
    from notekv.compose import MODES

    pairs = [(i, s) for i in range(len(ce.PREFIXES)) for s in ce.SKILLS][:COMPOSE_PAIRS]
    fp32, bf16 = (ce.fidelity(m, pairs=pairs, modes=MODES, seams=[], controls=False)["arms"]
                  for m in (smollm2, smollm2_bf16))
    assert set(fp32) == set(bf16) == set(MODES) | {"floor_incremental"}
    reach = [2 * abs(x["margin_full"] - y["margin_full"])
             for x, y in zip(fp32["prefix"]["per_pair"], bf16["prefix"]["per_pair"])]
    resolved_ref = [abs(x["margin_full"]) >= r for x, r in zip(fp32["prefix"]["per_pair"], reach)]
    assert sum(resolved_ref) > len(pairs) / 2, (resolved_ref, reach)
    same, unresolved = 0, []
    for arm in fp32:
        for i, (x, y) in enumerate(zip(fp32[arm]["per_pair"], bf16[arm]["per_pair"])):
            if (x["margin_arm"] > 0) == (y["margin_arm"] > 0):
                same += 1
            else:
                assert abs(x["margin_arm"]) < reach[i], (arm, pairs[i], x["margin_arm"], y["margin_arm"], reach[i])
                unresolved.append((arm, pairs[i]))
            if resolved_ref[i] and abs(x["margin_arm"]) >= reach[i]:
                assert x["decision_agree"] == y["decision_agree"], (arm, pairs[i], x, y)
    assert same >= 0.9 * (same + len(unresolved)), (same, unresolved)


@pytest.mark.slow
def test_the_three_commands_run_in_bf16(tmp_path, capsys):
    """``--dtype bf16`` on report, eval-edits and eval-compose: every stage runs, each output
    records the dtype, and eval-compose's dtype floor becomes the fp32 recompute."""
    import json

    from notekv_cli import main

    out = tmp_path / "report"
    assert main(["report", "--model", "smollm2-135m", "--dtype", "bf16", "--pairs", "10", "--act-pairs", "1",
                 "--heatmap-pairs", "1", "--out", str(out)]) == 0
    d = json.loads((out / "report.json").read_text())
    assert d["dtype"] == "bfloat16" and "bfloat16" in (out / "index.html").read_text()
    assert set(d["timings"]) >= {"prefill", "kv_patching", "read_heads", "write_direction"}
    assert d["n_used"] >= 4 and math.isfinite(d["direction"]["recovery"]["mean"])
    assert d["sanity"]["max_abs_stale"] < 1e-2  # patching OLD into OLD changes nothing, in bf16 too
    assert main(["eval-edits", "--model", "smollm2-135m", "--dtype", "bfloat16", "--scenario", "refund", "--cases", "1",
                 "--out", str(tmp_path / "edits")]) == 0
    e = json.loads((tmp_path / "edits" / "edits.json").read_text())
    assert e["dtype"] == "bfloat16" and e["n_valid"] == 1
    assert main(["eval-compose", "--model", "smollm2-135m", "--dtype", "bf16", "--pairs", "1", "--turns", "1",
                 "--keystone", "1", "--out", str(tmp_path / "compose")]) == 0
    c = json.loads((tmp_path / "compose" / "compose.json").read_text())
    assert c["dtype"] == "bfloat16"
    arms = c["fidelity"]["arms"]
    assert "floor_fp32" in arms and "floor_bf16" not in arms
    floors = [arms[f]["kl_mean"]["mean"] for f in ("floor_fp32", "floor_incremental")]
    assert min(floors) > 0  # in bf16 even the incremental prefill rounds differently from the full one
    assert arms["prefix"]["kl_mean"]["mean"] > max(floors)  # a spliced skill still errs above the dtype noise
    capsys.readouterr()
