"""Saving and loading KV caches: one safetensors file, metadata as JSON in its header.

The header records the format, the model fingerprint, the per-layer RoPE specs, segment
labels and the sha256 of every tensor's bytes. Loading parses no pickle, runs no code,
refuses another model's cache, and verifies every checksum.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .cache import CacheMismatchError, KVCache
from .rope import RopeSpec

FORMAT = "notekv.kvcache/1"


class CacheFileError(ValueError):
    """A cache file that is missing, truncated, corrupt or not a notekv cache."""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def _tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    out = {"keys": cache.keys, "values": cache.values, "positions": cache.positions, "token_ids": cache.token_ids}
    if cache.origin_keys is not cache.keys:
        out["origin_keys"] = cache.origin_keys
        out["origin_positions"] = cache.origin_positions
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def cache_parts(cache: KVCache) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)``: the JSON metadata and the CPU tensors that describe ``cache``."""
    tensors = _tensors(cache)
    meta = {
        "format": FORMAT, "fingerprint": cache.fingerprint, "rope": [r.to_json() for r in cache.rope],
        "segments": list(cache.segments), "max_positions": cache.max_positions,
        "sha256": {k: _digest(v) for k, v in tensors.items()},
    }
    return meta, tensors


def cache_from_parts(meta: dict, tensors: dict[str, torch.Tensor], device=None) -> KVCache:
    """The inverse of :func:`cache_parts` (checksums are the caller's to verify)."""
    def dev(t):
        return t if device is None else t.to(device)

    return KVCache(
        keys=dev(tensors["keys"]), values=dev(tensors["values"]), positions=tensors["positions"],
        token_ids=tensors["token_ids"], segments=tuple(meta["segments"]), fingerprint=meta["fingerprint"],
        rope=tuple(RopeSpec.from_json(r) for r in meta["rope"]), max_positions=meta["max_positions"],
        origin_keys=dev(tensors["origin_keys"]) if "origin_keys" in tensors else None,
        origin_positions=tensors.get("origin_positions"),
    )


def save_cache(cache: KVCache, path: str | Path) -> Path:
    """Write ``cache`` to ``path`` (conventionally ``*.nkv``); returns the path."""
    from safetensors.torch import save_file

    meta, tensors = cache_parts(cache)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"notekv": json.dumps(meta)})
    return path


def load_cache(path: str | Path, model) -> KVCache:
    """Read a cache written by :func:`save_cache` for ``model`` (a HookedModel)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"no cache file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a bad header/body
        raise CacheFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {err}); re-save the cache"
        ) from None
    if "notekv" not in header:
        raise CacheFileError(f"{path} is a safetensors file but not a notekv cache (no 'notekv' metadata)")
    meta = json.loads(header["notekv"])
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path} has format {meta.get('format')!r}; this notekv reads {FORMAT!r}")
    if meta["fingerprint"] != dict(model.fingerprint):
        raise CacheMismatchError(
            f"{path} was computed by another model ({meta['fingerprint']}); {model.name} is "
            f"{model.fingerprint}. Recompute the cache with this model."
        )
    expected = meta["sha256"]
    if set(expected) != set(tensors):
        raise CacheFileError(f"{path} holds tensors {sorted(tensors)} but its header lists {sorted(expected)}")
    for k, t in tensors.items():
        if _digest(t) != expected[k]:
            raise CacheFileError(f"{path}: checksum mismatch for {k!r}; the file is corrupt, re-save the cache")
    return cache_from_parts(meta, tensors, model.device)
