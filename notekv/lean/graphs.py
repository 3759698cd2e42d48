"""CUDA-graph capture of the lean forward, one graph per (suffix length, logits) shape.

A graph replays the kernels of one forward with the ids and positions read from static
input tensors, so a suffix prefill costs its kernels and nothing of Python or launches.
The forward attends over the whole buffer under the position mask, so one graph serves
every context length up to the engine's capacity. Graphs share one memory pool and are
replayed one at a time.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


class GraphCache:
    """``run(ids, at, kv_len, logits)``: capture on first use of a shape, then replay.

    ``forward(ids [1, s], qpos [s], kv_len, logits)`` must only read its inputs through the
    tensors it is given and write the engine's buffers (no host synchronisation).
    ``capture=False`` runs the same static-shape call eagerly (any device). At most
    ``max_graphs`` shapes are kept; capturing one more drops the least recently used. If a
    capture fails, a warning says so and every later call runs uncaptured.
    """

    def __init__(self, forward: Callable, *, capture: bool = True, warmup: int = 2, max_graphs: int = 16):
        self.forward = forward
        self.capture = capture
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def replay(self, ids: torch.Tensor, at: int, kv_len: int, logits: str | None):
        s = ids.shape[1]
        if not self.capture:
            return self.forward(ids, torch.arange(at, at + s, device=ids.device), kv_len, logits)
        key = (s, kv_len, logits)
        entry = self.graphs.pop(key, None)
        if entry is None:
            try:
                entry = self._capture(ids, at, kv_len, logits)
            except RuntimeError as err:  # e.g. an attention kernel that cannot be captured
                warnings.warn(f"CUDA graph capture failed ({err}); the lean engine continues without graphs",
                              RuntimeWarning, stacklevel=3)
                self.capture = False
                self.graphs.clear()
                return self.replay(ids, at, kv_len, logits)
        self.graphs[key] = entry  # most recently used last
        graph, ids_buf, base, pos_buf, out = entry
        ids_buf.copy_(ids, non_blocking=True)
        torch.add(base, at, out=pos_buf)
        graph.replay()
        return None if out is None else out.clone()

    def _capture(self, ids: torch.Tensor, at: int, kv_len: int, logits: str | None):
        while len(self.graphs) >= self.max_graphs:
            del self.graphs[next(iter(self.graphs))]
        dev = ids.device
        s = ids.shape[1]
        ids_buf = ids.clone()
        base = torch.arange(s, device=dev)
        pos_buf = base + at
        # Warm-up on a side stream (allocator and autotuning settle before capture). It
        # writes the same K/V the replay will write, so it changes nothing observable.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(ids_buf, pos_buf, kv_len, logits)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(ids_buf, pos_buf, kv_len, logits)
        return graph, ids_buf, base, pos_buf, out
