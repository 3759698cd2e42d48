"""Benchmarks run at toy size on CPU (their timings are printed, never asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_rotate_benchmark_runs_at_toy_size(tmp_path):
    import rotate

    result = rotate.main(["--toy", "--reps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "rotate-toy-cpu.json").read_text())
    assert saved["rows"] == result["rows"] and len(result["rows"]) == 3
    for row in result["rows"]:
        assert {"head_dim", "seq", "layers", "kv_heads", "bytes", "median_ms", "gbps", "copy_gbps"} <= set(row)
        assert row["bytes"] == 2 * row["layers"] * row["kv_heads"] * row["seq"] * row["head_dim"] * 2
