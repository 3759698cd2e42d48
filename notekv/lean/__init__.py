"""The lean runtime: a static KV buffer, grouped attention without K/V expansion, the fused
rotation writing into the buffer, CUDA graphs for the suffix, last-token logits only."""

from .engine import LeanEngine, engine_for
from .forward import LeanUnsupportedError, lean_support
from .partial import forward_from

__all__ = ["LeanEngine", "LeanUnsupportedError", "engine_for", "forward_from", "lean_support"]
