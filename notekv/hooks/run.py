"""``Run``: the result of one hooked forward, and cache helpers the hook layer needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .positions import TokenView
from .sites import site as parse_site


class CacheError(ValueError):
    """A cache that cannot be used where it was passed."""


@dataclass
class Run:
    """Logits ``[B, S, vocab]``, collected activations keyed by site string, the KV cache
    after the forward (a transformers ``DynamicCache``, one full-length layer per model
    layer), the token ids ``[B, S]`` and the prompt's :class:`TokenView` (batch row 0)."""

    logits: torch.Tensor | None
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    kv: object | None = None
    ids: torch.Tensor | None = None
    view: TokenView | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        key = str(parse_site(name))
        if key not in self.acts:
            raise KeyError(f"{key} was not collected; collected: {sorted(self.acts)}")
        return self.acts[key]

    @property
    def tokens(self) -> list[str]:
        return list(self.view.tokens) if self.view is not None else []

    def logit_diff(self, a: int, b: int, pos: int = -1) -> torch.Tensor:
        """``logit[a] - logit[b]`` at ``pos`` for each batch row, shape ``[B]``."""
        return self.logits[:, pos, a] - self.logits[:, pos, b]


def copy_cache(cache, room: int = 0):
    """A new ``DynamicCache`` whose layers point at ``cache``'s tensors (no copy).

    Appending to the copy (``update`` concatenates into new tensors) leaves ``cache``
    untouched. Sliding-window layers that dropped tokens cannot be copied into full layers.
    A notekv KVCache with ``room > 0`` gives preallocated layers with that many free slots.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if isinstance(cache, Run):
        cache = cache.kv
    if hasattr(cache, "to_hf"):  # a notekv KVCache: its layers are views already
        return cache.to_hf(room=room)
    if cache is None:
        return DynamicCache()
    if not hasattr(cache, "layers"):
        raise CacheError(f"expected a transformers Cache or a Run, got {type(cache).__name__}")
    lengths = {layer.keys.shape[2] for layer in cache.layers if getattr(layer, "is_initialized", False)}
    if len(lengths) > 1:
        raise CacheError(
            f"cache layers hold different numbers of tokens {sorted(lengths)}: a sliding-window "
            "cache has dropped tokens. Prefill through notekv (model.run) to keep every layer full."
        )
    out = DynamicCache()
    out.layers = []
    for layer in cache.layers:
        new = DynamicLayer()
        if getattr(layer, "is_initialized", False):
            new.lazy_initialization(layer.keys, layer.values)
            new.keys, new.values = layer.keys, layer.values
        out.layers.append(new)
    return out


def cache_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, n_layers: int):
    """A ``DynamicCache`` from ``{prefix}/kv/{l}/k|v`` entries of a tensor dict."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for l in range(n_layers):
        layer = DynamicLayer()
        k, v = tensors[f"{prefix}/kv/{l}/k"], tensors[f"{prefix}/kv/{l}/v"]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache
