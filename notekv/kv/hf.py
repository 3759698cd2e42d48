"""A transformers cache layer over a preallocated buffer (appends write in place)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers ``[B, H, capacity, D]``.

    ``update`` writes the new tokens into the free room instead of concatenating (it
    doubles the buffer if the room runs out). The buffers belong to this layer alone.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        b, h, n, d = keys.shape
        self._kbuf = keys.new_empty(b, h, n + room, d)
        self._vbuf = values.new_empty(b, h, n + room, values.shape[-1])
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self._n = n
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._kbuf[:, :, : self._n]
        self.values = self._vbuf[:, :, : self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        s = key_states.shape[2]
        if self._n + s > self._kbuf.shape[2]:
            cap = max(2 * self._kbuf.shape[2], self._n + s)
            kbuf = self._kbuf.new_empty(*self._kbuf.shape[:2], cap, self._kbuf.shape[3])
            vbuf = self._vbuf.new_empty(*self._vbuf.shape[:2], cap, self._vbuf.shape[3])
            kbuf[:, :, : self._n] = self.keys
            vbuf[:, :, : self._n] = self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[:, :, self._n : self._n + s] = key_states
        self._vbuf[:, :, self._n : self._n + s] = value_states
        self._n += s
        self._expose()
        return self.keys, self.values

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self._n - abs(max_length)
        self._n = min(self._n, max_length)
        self._expose()

    @property
    def capacity(self) -> int:
        return self._kbuf.shape[2]


def dynamic_cache(keys, values, room: int = 0):
    """The one way notekv builds a transformers ``DynamicCache``: layer ``l`` holds
    ``keys[l]`` / ``values[l]`` (``[B, H_kv, S, D]`` each).

    ``room == 0``: the layers are views of the given tensors (no copy); an append
    concatenates into new tensors, so the given tensors never change. ``room > 0``: each
    layer copies them once into its own buffer with ``room`` free slots, and appends write in
    place (what decoding wants). ``keys``/``values``: a sequence of per-layer tensors or a
    stacked ``[L, B, H_kv, S, D]`` tensor; empty (no layers) gives an empty cache.
    """
    from transformers import DynamicCache

    out = DynamicCache()
    out.layers = []
    for k, v in zip(keys, values):
        if room > 0:
            layer = PreallocatedLayer(k, v, room)
        else:
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        out.layers.append(layer)
    return out


def empty_cache(model):
    """The one way notekv starts an empty transformers cache for a forward of ``model`` (a
    HookedModel): a ``DynamicCache`` whose layers keep every token, or, on a hybrid
    (``FamilyLayout.recurrent``), one built from the config so that its state-space layers
    get layers that hold their conv/SSM states."""
    from transformers import DynamicCache

    if model.spec.layout.recurrent is not None:
        return DynamicCache(config=model.hf.config)
    return DynamicCache()
