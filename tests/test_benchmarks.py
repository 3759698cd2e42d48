"""Benchmarks run at toy size on CPU (their timings are printed, never asserted)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_rotate_benchmark_runs_at_toy_size(tmp_path):
    import rotate

    result = rotate.main(["--toy", "--reps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "rotate-toy-cpu.json").read_text())
    assert saved["rows"] == result["rows"] and len(result["rows"]) == 3
    for row in result["rows"]:
        assert {"head_dim", "seq", "layers", "kv_heads", "bytes", "median_ms", "gbps", "copy_gbps"} <= set(row)
        assert row["bytes"] == 2 * row["layers"] * row["kv_heads"] * row["seq"] * row["head_dim"] * 2


def test_ttft_benchmark_runs_at_toy_size(tmp_path):
    import ttft

    # static mode: the whole-buffer computation a CUDA graph replays, run eagerly
    result = ttft.main(["--toy", "--reps", "2", "--n-ctx", "64", "--suffix", "8", "--lean-mode", "static",
                        "--out", str(tmp_path)])
    assert result["lean_mode"] == "static"
    saved = json.loads((tmp_path / "ttft-toy-cpu.json").read_text())
    assert saved["rows"] == result["rows"]
    assert [r["arm"] for r in result["rows"]] == list(ttft.ARMS)
    for row in result["rows"]:
        assert {"model", "n_ctx", "suffix", "arm", "median_ms"} <= set(row)
        assert (row["model"], row["n_ctx"], row["suffix"]) == ("toy-llama", 64, 8) and row["median_ms"] > 0
    (check,) = result["checks"]
    # fp32 on CPU: the lean engine's prefix hit and composition agree with transformers
    assert check["prefix_hit_vs_full_max_abs"] <= 1e-5 * max(1.0, check["logit_scale"])
    assert check["compose_lean_vs_hf_max_abs"] <= 1e-5 * max(1.0, check["logit_scale"])
    assert check["prefix_hit_argmax_agrees"] and check["compose_argmax_agrees"]


def test_gpu_script_refuses_without_cuda():
    import subprocess

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the full benchmarks")
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_all.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert res.returncode != 0 and "no CUDA device" in res.stderr


def test_sweep_benchmark_runs_at_toy_size(tmp_path):
    import sweeps

    result = sweeps.main(["--toy", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sweeps-toy-cpu.json").read_text())
    assert saved["arms"] == result["arms"] and [a["arm"] for a in result["arms"]] == ["notekv", "notekv_hooks", "tl"]
    assert result["equal"] and result["max_abs_diff_vs_tl"] <= 1e-4
    grid, _, tl = result["arms"]
    assert grid["cells"] == result["layers"] * result["prompt_tokens"]
    assert grid["computed_cells"] == result["layers"] * (result["prompt_tokens"] - result["first_diff"])
    assert tl["cells"] == len(result["tl_layers"]) * len(result["tl_positions"])
    # cells on both sides of the first difference are compared
    assert min(result["tl_positions"]) < result["first_diff"] <= max(result["tl_positions"])
    assert result["metric_range"][0] < result["metric_range"][1]


def test_scaling_benchmark_runs_at_toy_size(tmp_path):
    import scaling

    result = scaling.main(["--toy", "--in-process", "--pairs", "4", "--act-pairs", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scaling-toy-cpu.json").read_text())
    assert saved["lengths"] == result["lengths"] and saved["rows"]["rows"] == result["rows"]["rows"]
    assert [r["context_tokens"] for r in result["lengths"]] == list(scaling.TOY_LENGTHS)
    for row in result["lengths"]:
        assert row["prompt_tokens"]["max"] <= row["context_tokens"] < 2 * row["prompt_tokens"]["min"]
        assert list(row["stages"]) == list(row["timings"])  # every stage the report timed was measured
        assert {"prefill", "kv_patching", "activation_patching", "write_direction"} <= set(row["stages"])
        for st in row["stages"].values():
            assert st["seconds"] >= 0 and 0 < st["peak_gb"] <= row["max_rss_gb"] + 0.05
    assert set(result["exponents"]) == set(scaling.stage_names(result["lengths"]))
    rows = result["rows"]["rows"]
    assert [(r["arm"], r["rows"]) for r in rows] == [(a, n) for a in ("budget", "unbounded") for n in scaling.TOY_ROWS]
    assert all(r["rows_per_step"] >= 1 and r["seconds"] > 0 for r in rows)
    assert scaling.fit_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert scaling.fit_exponent([1], [1]) is None


def test_attribution_benchmark_runs_at_toy_size(tmp_path):
    import attribution

    result = attribution.main(["--toy", "--sample", "24", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "attribution-toy-cpu.json").read_text())
    assert saved["rows"] == result["rows"] and [r["tokens"] for r in result["rows"]] == [64, 128]
    for r in result["rows"]:
        assert r["live_cells"] == r["layers"] * (r["tokens"] - 1 - r["first_diff"])
        assert r["exact_sample_cells"] == 24 and r["exact_full_map_s_extrapolated"] > r["exact_sample_s"]
        assert r["spearman_on_sample"] > 0.8  # the estimate ranks the sampled cells as exact patching does


def test_runner_benchmark_runs_at_toy_size(tmp_path, tiny_scenario):
    import runner

    result = runner.main(["--toy", "--scenario", str(tmp_path / "tiny_gate.toml"), "--reps", "1", "--sample", "8",
                          "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "runner-toy-cpu.json").read_text())
    assert saved["rows"] == result["rows"] and [r["job"] for r in saved["rows"]] == ["exact_kv", "battery"]
    assert all(r["max_abs_diff"] <= runner.TOLERANCE and r["hooks_s"] > 0 and r["lean_s"] > 0 for r in saved["rows"])
    assert saved["rows"][0]["rows"] == 8
