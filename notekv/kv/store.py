"""Saving and loading KV caches: one safetensors file, metadata as JSON in its header.

The header records the format, the model fingerprint, the per-layer RoPE specs, segment
labels and the sha256 of every tensor's bytes, and a sha256 of the header itself, so the
whole file is checksummed. Loading parses no pickle, runs no code, verifies every checksum,
refuses another model's cache and checks the header against the loading model (RoPE specs,
position range, shapes, token ids), so an edited header cannot make ``reposition`` silently
do the wrong thing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import NotekvError
from .cache import CacheMismatchError, KVCache
from .rope import RopeSpec, layer_specs

FORMAT = "notekv.kvcache/1"


class CacheFileError(NotekvError, ValueError):
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
    meta["header_sha256"] = _header_digest(meta)
    return meta, tensors


def _header_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cache_from_parts(meta: dict, tensors: dict[str, torch.Tensor], device=None) -> KVCache:
    """The inverse of :func:`cache_parts` (checksums are the caller's to verify)."""
    def dev(t):
        return t if device is None else t.to(device)

    try:
        rope = tuple(RopeSpec.from_json(r) for r in meta["rope"])
    except (TypeError, KeyError) as err:
        raise CacheFileError(f"the cache header's RoPE specs are malformed ({err})") from None
    return KVCache(
        keys=dev(tensors["keys"]), values=dev(tensors["values"]), positions=tensors["positions"],
        token_ids=tensors["token_ids"], segments=tuple(meta["segments"]), fingerprint=meta["fingerprint"],
        rope=rope, max_positions=meta["max_positions"],
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
    try:
        meta = json.loads(header["notekv"])
    except json.JSONDecodeError as err:
        raise CacheFileError(f"{path}: the notekv header is not valid JSON ({err}); re-save the cache") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CacheFileError(f"{path} has format {fmt!r}; this notekv reads {FORMAT!r}")
    if meta.get("header_sha256") != _header_digest(meta):
        raise CacheFileError(f"{path}: the header's checksum does not match its content (edited or corrupt "
                             "header); re-save the cache")
    if meta.get("fingerprint") != dict(model.fingerprint):
        raise CacheMismatchError(
            f"{path} was computed by another model ({meta['fingerprint']}); {model.name} is "
            f"{model.fingerprint}. Recompute the cache with this model."
        )
    expected = meta.get("sha256")
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise CacheFileError(f"{path} holds tensors {sorted(tensors)} but its header lists {sorted(expected)}")
    for k, t in tensors.items():
        if _digest(t) != expected[k]:
            raise CacheFileError(f"{path}: checksum mismatch for {k!r}; the file is corrupt, re-save the cache")
    _check_against_model(path, meta, tensors, model)
    try:
        return cache_from_parts(meta, tensors, model.device)
    except (ValueError, KeyError, TypeError) as err:
        raise CacheFileError(f"{path}: the cache's tensors and header disagree ({err}); re-save the cache") from None


def _check_against_model(path: Path, meta: dict, tensors: dict, model) -> None:
    """The header and tensor shapes must describe what ``model`` computes."""
    spec = model.spec
    want_rope = json.loads(json.dumps([r.to_json() for r in layer_specs(spec)]))
    if meta.get("rope") != want_rope:
        raise CacheFileError(f"{path}: its RoPE specs differ from {model.name}'s (edited header); re-save the cache")
    if meta.get("max_positions") != spec.max_positions:
        raise CacheFileError(f"{path}: max_positions {meta.get('max_positions')} differs from {model.name}'s "
                             f"{spec.max_positions} (edited header); re-save the cache")
    k = tensors.get("keys")
    shape = (spec.n_layers, spec.n_kv_heads, spec.head_dim)
    if k is None or k.dim() != 5 or (k.shape[0], k.shape[2], k.shape[4]) != shape:
        got = None if k is None else tuple(k.shape)
        raise CacheFileError(f"{path}: keys of shape {got} do not fit {model.name} ([{shape[0]}, B, {shape[1]}, "
                             f"S, {shape[2]}])")
    for name in ("positions", "origin_positions"):
        pos = tensors.get(name)
        if pos is not None and pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= spec.max_positions):
            raise CacheFileError(f"{path}: {name} run {int(pos.min())}..{int(pos.max())}, outside {model.name}'s "
                                 f"0..{spec.max_positions - 1}")
    ids = tensors.get("token_ids")
    if ids is not None and ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= spec.vocab_size):
        raise CacheFileError(f"{path}: token ids outside {model.name}'s vocabulary of {spec.vocab_size}")



