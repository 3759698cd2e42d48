"""Latent attention (DeepSeek MLA): notekv caches the per-head K/V a model expands from its latent.

transformers' MLA attention caches a compressed latent per token (the normalized ``kv_nope``
latent ``[B, 1, S, kv_lora_rank]`` and the rotated, head-shared ``k_pe`` ``[B, 1, S,
qk_rope_head_dim]``) and expands it on every forward, with the attention module's
``expand_kv``, into per-head keys ``[B, H, S, qk_nope + qk_rope]`` (the rotary part last) and
values ``[B, H, S, v_head_dim]``. notekv's cache sites (``attn.k``/``attn.v``/``kv.*``), KV
patches, repositioning and splicing address per-head K/V, so inside every notekv hook
context each attention module of a family with ``FamilyLayout.kv_expand``:

* sees its cache through :class:`ExpandingCache`, whose ``update(latent, k_pe)`` expands the
  new tokens with the module's own ``expand_kv`` and stores the per-head K/V in the real cache
  (whose ``update`` is where notekv's cache sites read and write them), and
* attends with exactly what the cache returned: its ``expand_kv`` passes the cache's per-head
  K/V through (anything else it expands as the model does).

A cache filled through notekv therefore holds expanded K/V, as :class:`~notekv.KVCache` does;
one the plain model filled holds latents, which :func:`expanded_layers` expands (what
``KVCache.from_hf`` calls). Expanding is the model's own computation on the same latents, so
the K/V are bitwise those the plain model attends with; they take ``H * (2 * qk_nope + qk_rope
+ v) / (kv_lora_rank + qk_rope)`` times the latent's memory.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.arch import ArchSpec, get_submodule

_PENDING = "_notekv_expanded"  # what the cache just returned, for expand_kv to pass through
_USERS = "_notekv_expand_users"  # hook contexts that patched expand_kv on this module


class ExpandingCache:
    """The cache as one MLA attention module sees it under notekv (every other attribute is
    the real cache's): ``update(latent [B, 1, S, r], k_pe [B, 1, S, R], layer)`` stores and
    returns per-head ``K [B, H, S_cache, D_k]``, ``V [B, H, S_cache, D_v]``."""

    def __init__(self, cache, module: nn.Module, method: str):
        self._cache = cache
        self._module = module
        self._expand = getattr(type(module), method).__get__(module)  # the model's own, unpatched

    def update(self, latent: torch.Tensor, k_pe: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self._expand(latent, k_pe)
        keys, values = self._cache.update(keys, values, layer_idx, *args, **kwargs)
        vars(self._module)[_PENDING] = (keys, values)
        return keys, values

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


class _Unpatch:
    """A handle whose ``remove()`` undoes one context's patch of ``expand_kv`` (the last
    context out restores the module's own method)."""

    def __init__(self, module: nn.Module, method: str):
        self.module, self.method = module, method

    def remove(self) -> None:
        d = vars(self.module)
        d[_USERS] = d.get(_USERS, 1) - 1
        if d[_USERS] <= 0:
            d.pop(_USERS, None)
            d.pop(self.method, None)
            d.pop(_PENDING, None)


def _pass_through(module: nn.Module, method: str):
    expand = getattr(type(module), method).__get__(module)

    def expand_kv(latent: torch.Tensor, k_pe: torch.Tensor):
        got = vars(module).pop(_PENDING, None)
        if got is not None and got[0] is latent and got[1] is k_pe:
            return got
        return expand(latent, k_pe)

    return expand_kv


def _swap_cache(method: str):
    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or isinstance(cache, ExpandingCache):
            return None
        return args, {**kwargs, "past_key_values": ExpandingCache(cache, module, method)}
    return hook


def install(hf: nn.Module, spec: ArchSpec) -> list:
    """Make every attention module of ``hf`` cache expanded K/V (see the module docstring);
    returns handles whose ``remove()`` undoes it (one context's share). Nothing for a family
    without ``kv_expand``."""
    method = spec.layout.kv_expand
    if method is None:
        return []
    lay = spec.layout
    handles = []
    for l in range(spec.n_layers):
        module = get_submodule(hf, f"{lay.layers}.{l}.{lay.attn}")
        handles.append(module.register_forward_pre_hook(_swap_cache(method), with_kwargs=True))
        d = vars(module)
        if not d.get(_USERS):
            d[method] = _pass_through(module, method)
        d[_USERS] = d.get(_USERS, 0) + 1
        handles.append(_Unpatch(module, method))
    return handles


def _is_expanded(keys: torch.Tensor, values: torch.Tensor, spec: ArchSpec) -> bool:
    return (keys.dim() == 4 and keys.shape[1] == spec.n_kv_heads and keys.shape[-1] == spec.head_dim
            and values.shape[-1] == spec.v_dim)


def is_latent(keys: torch.Tensor, values: torch.Tensor, spec: ArchSpec, layer: int = 0) -> bool:
    """Whether one cache layer holds the model's latent (``[B, 1, S, r]`` and the rotated
    ``k_pe`` ``[B, 1, S, rotary_dim]``) rather than per-head K/V."""
    return (spec.layout.kv_expand is not None and not _is_expanded(keys, values, spec) and keys.dim() == 4
            and keys.shape[1] == 1 and values.shape[1] == 1 and values.shape[-1] == spec.rope[layer].rotary_dim)


def expanded_layers(layers, model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``(keys, values)`` of transformers cache ``layers`` as per-head K/V: expanded
    with each attention module's own ``expand_kv`` where a layer holds the latent, as they are
    where it holds expanded K/V already (a cache filled through notekv)."""
    spec = model.spec
    lay = spec.layout
    keys, values = [], []
    for l, layer in enumerate(layers):
        k, v = layer.keys, layer.values
        if is_latent(k, v, spec, l):
            module = get_submodule(model.hf, f"{lay.layers}.{l}.{lay.attn}")
            k, v = getattr(type(module), lay.kv_expand)(module, k, v)
        keys.append(k)
        values.append(v)
    return keys, values
