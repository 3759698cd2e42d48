"""Shared by the benchmarks: the timer (CUDA events on CUDA, ``perf_counter`` elsewhere),
the results file and freeing memory between configurations."""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int, device: torch.device, warmup: int = 0) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` calls after ``warmup``
    untimed ones. On CUDA each call is bracketed by events and synchronised, so the time
    includes host overhead the GPU waits through (what a user sees)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = device.type == "cuda"
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def device_tag(device: torch.device, toy: bool) -> str:
    """``"toy-cpu"`` for toy runs on CPU, else the device type (``"cuda"``, ``"cpu"``)."""
    return "toy-cpu" if toy and device.type == "cpu" else device.type


def write_result(out_dir, name: str, result: dict) -> Path:
    """Write ``result`` to ``out_dir/name.json`` (creating the folder); returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, between configurations."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
