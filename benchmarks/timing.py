"""Shared timer for the benchmarks: CUDA events on CUDA, ``perf_counter`` elsewhere."""

from __future__ import annotations

import statistics
import time
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
