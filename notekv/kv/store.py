"""Saving and loading KV caches: one safetensors file, metadata as JSON in its header.

The header records the format, the model fingerprint, the per-layer RoPE specs, segment
labels and the sha256 of every tensor's bytes, and a sha256 of the header itself, so the
whole file is checksummed. Loading parses no pickle, runs no code, verifies every checksum,
refuses another model's cache and checks the header against the loading model (RoPE specs,
position range, shapes, token ids), so an edited header cannot make ``reposition`` silently
do the wrong thing.

:func:`check_cache` is the one validation of a stored cache, whatever holds it (a ``.nkv``
file, a skill, an interventions file): every loader calls it. A save is all-or-nothing
(see :mod:`notekv.kv.atomic`): the file is written to a hidden temporary and renamed over
``path`` last; a file already at ``path`` with different content is replaced only with
``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import NotekvError
from . import atomic
from .cache import CacheMismatchError, KVCache
from .rope import RopeSpec, layer_specs

FORMAT = "notekv.kvcache/1"
TENSORS = ("keys", "values", "positions", "token_ids", "origin_keys", "origin_positions")
HEADER = {"format": str, "fingerprint": dict, "rope": list, "segments": list, "max_positions": int,
          "sha256": dict, "header_sha256": str}  # the keys every cache header has, and their JSON types


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


def cache_parts(cache: KVCache, extra: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)``: the JSON metadata and the CPU tensors that describe ``cache``;
    ``extra`` keys join the header (and its checksum)."""
    tensors = _tensors(cache)
    meta = {
        "format": FORMAT, "fingerprint": cache.fingerprint, "rope": [r.to_json() for r in cache.rope],
        "segments": list(cache.segments), "max_positions": cache.max_positions,
        "sha256": {k: _digest(v) for k, v in tensors.items()}, **(extra or {}),
    }
    meta["header_sha256"] = _header_digest(meta)
    return meta, tensors


def _header_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _ModelCheckPending(KVCache):
    """A cache read without its model (from an interventions file loaded without ``model=``):
    the checks against a model run when it first meets one (:meth:`check_model`)."""

    def check_model(self, model) -> None:
        super().check_model(model)
        check_against_model(self, model, self.__dict__.get("_where", "a cache read without its model"))


def cache_from_parts(meta: dict, tensors: dict[str, torch.Tensor], device=None, cls=KVCache) -> KVCache:
    """The inverse of :func:`cache_parts`, unchecked: loaders call :func:`check_cache`."""
    def dev(t):
        return t if device is None else t.to(device)

    try:
        rope = tuple(RopeSpec.from_json(r) for r in meta["rope"])
    except (TypeError, KeyError, ValueError) as err:
        raise CacheFileError(f"the cache header's RoPE specs are malformed ({err})") from None
    return cls(
        keys=dev(tensors["keys"]), values=dev(tensors["values"]), positions=tensors["positions"],
        token_ids=tensors["token_ids"], segments=tuple(meta["segments"]), fingerprint=meta["fingerprint"],
        rope=rope, max_positions=meta["max_positions"],
        origin_keys=dev(tensors["origin_keys"]) if "origin_keys" in tensors else None,
        origin_positions=tensors.get("origin_positions"),
    )


def check_cache(meta, tensors: dict[str, torch.Tensor], model=None, *, where: str, device=None) -> KVCache:
    """The one validation of a stored cache, whatever holds it: ``meta`` (its JSON header) and
    ``tensors`` (by name) must be a well-formed, checksummed cache, and with ``model`` one that
    ``model`` computed (fingerprint, RoPE specs, position range, shapes, vocabulary). Without a
    model those checks run when the cache first meets one. ``where`` names the container in
    errors. Raises :class:`CacheFileError` (or :class:`CacheMismatchError` for another
    model's cache)."""
    w = where
    if not isinstance(meta, dict):
        raise CacheFileError(f"{w}: the cache header is a JSON {type(meta).__name__}, not an object; "
                             "re-save the cache")
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{w} has format {meta.get('format')!r}; this notekv reads {FORMAT!r}")
    for key, kind in HEADER.items():
        if key not in meta:
            raise CacheFileError(f"{w}: the cache header lacks {key!r} (truncated or edited header); re-save the cache")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CacheFileError(f"{w}: the cache header's {key!r} is a {type(meta[key]).__name__}, expected "
                                 f"{kind.__name__} (edited header); re-save the cache")
    if meta["header_sha256"] != _header_digest(meta):
        raise CacheFileError(f"{w}: the header's checksum does not match its content (edited or corrupt "
                             "header); re-save the cache")
    if model is not None and meta["fingerprint"] != dict(model.fingerprint):
        raise CacheMismatchError(f"{w} was computed by another model ({meta['fingerprint']}); {model.name} is "
                                 f"{model.fingerprint}. Recompute the cache with this model.")
    expected = meta["sha256"]
    if set(expected) != set(tensors):
        raise CacheFileError(f"{w} holds tensors {sorted(tensors)} but its header lists {sorted(expected)}; "
                             "re-save the cache")
    names = set(expected)
    if (not {"keys", "values", "positions", "token_ids"} <= names or not names <= set(TENSORS)
            or ("origin_keys" in names) != ("origin_positions" in names)):
        raise CacheFileError(f"{w}: tensors {sorted(names)}; a cache holds keys, values, positions, token_ids "
                             "and optionally origin_keys with origin_positions")
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor) or _digest(t) != expected[k]:
            raise CacheFileError(f"{w}: checksum mismatch for {k!r}; the file is corrupt, re-save the cache")
    _check_tensors(w, tensors)
    try:
        cache = cache_from_parts(meta, tensors, device, KVCache if model is not None else _ModelCheckPending)
    except CacheFileError as err:
        raise CacheFileError(f"{w}: {err}; re-save the cache") from None
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise CacheFileError(f"{w}: the cache's tensors and header disagree ({err}); re-save the cache") from None
    if model is not None:
        check_against_model(cache, model, w)
    else:
        object.__setattr__(cache, "_where", w)
    _check_consistent(cache, w)
    return cache


def _check_tensors(w: str, tensors: dict[str, torch.Tensor]) -> None:
    """Dtypes and ranks: float K/V ``[L, B, H, S, D]``, int64 per-slot vectors ``[S]``."""
    for name in ("keys", "values", "origin_keys"):
        t = tensors.get(name)
        if t is not None and (t.dim() != 5 or not t.is_floating_point()):
            raise CacheFileError(f"{w}: {name} is {t.dtype} of shape {tuple(t.shape)}; a cache holds floating "
                                 "[layers, batch, kv_heads, slots, head_dim] tensors; re-save the cache")
    for name in ("positions", "token_ids", "origin_positions"):
        t = tensors.get(name)
        if t is not None and (t.dim() != 1 or t.dtype != torch.int64):
            raise CacheFileError(f"{w}: {name} is {t.dtype} of shape {tuple(t.shape)}; expected int64 [slots]; "
                                 "re-save the cache")
    ok, k = tensors.get("origin_keys"), tensors["keys"]
    if ok is not None and (ok.shape != k.shape or tensors["origin_positions"].shape != tensors["positions"].shape):
        raise CacheFileError(f"{w}: origin_keys/origin_positions do not match the shapes of keys/positions; "
                             "re-save the cache")


def _check_consistent(cache: KVCache, w: str) -> None:
    """Model-free: labels are text, positions lie in the header's range, token ids are ids."""
    if not all(isinstance(s, str) for s in cache.segments):
        raise CacheFileError(f"{w}: segment labels must be strings (edited header); re-save the cache")
    limit = cache.max_positions
    if limit < 0:
        raise CacheFileError(f"{w}: max_positions {limit} is negative (edited header); re-save the cache")
    for name in ("positions", "origin_positions"):
        pos = getattr(cache, name)
        if pos.numel() and (int(pos.min()) < 0 or (limit and int(pos.max()) >= limit)):
            raise CacheFileError(f"{w}: {name} run {int(pos.min())}..{int(pos.max())}, outside 0..{limit - 1}; "
                                 "re-save the cache")
    if cache.token_ids.numel() and int(cache.token_ids.min()) < -1:
        raise CacheFileError(f"{w}: token ids below -1; re-save the cache")


def check_against_model(cache: KVCache, model, where: str) -> None:
    """The header and tensor shapes of a stored ``cache`` must describe what ``model`` computes
    (RoPE specs, position range, K/V shapes, vocabulary); else :class:`CacheFileError`."""
    spec = model.spec
    have = json.loads(json.dumps([r.to_json() for r in cache.rope]))
    if have != json.loads(json.dumps([r.to_json() for r in layer_specs(spec)])):
        raise CacheFileError(f"{where}: its RoPE specs differ from {model.name}'s (edited header); re-save the cache")
    if cache.max_positions != spec.max_positions:
        raise CacheFileError(f"{where}: max_positions {cache.max_positions} differs from {model.name}'s "
                             f"{spec.max_positions} (edited header); re-save the cache")
    k = cache.keys
    shape = (spec.n_layers, spec.n_kv_heads, spec.head_dim)
    if k.dim() != 5 or (k.shape[0], k.shape[2], k.shape[4]) != shape:
        raise CacheFileError(f"{where}: keys of shape {tuple(k.shape)} do not fit {model.name} ([{shape[0]}, B, "
                             f"{shape[1]}, S, {shape[2]}])")
    for name in ("positions", "origin_positions"):
        pos = getattr(cache, name)
        if pos.numel() and (int(pos.min()) < 0 or (spec.max_positions and int(pos.max()) >= spec.max_positions)):
            raise CacheFileError(f"{where}: {name} run {int(pos.min())}..{int(pos.max())}, outside {model.name}'s "
                                 f"0..{spec.max_positions - 1}")
    ids = cache.token_ids
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= spec.vocab_size):
        raise CacheFileError(f"{where}: token ids outside {model.name}'s vocabulary of {spec.vocab_size}")


# ---------------------------------------------------------------------------- files
def header_id(path: Path) -> str | None:
    """The header checksum of the cache file at ``path`` (what its content is), or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("notekv", "null"))
    return meta.get("header_sha256") if isinstance(meta, dict) else None


def write_cache_file(meta: dict, tensors: dict[str, torch.Tensor], path, *, overwrite: bool = False, side=None,
                     what: str = "path", fix: str | None = None) -> Path:
    """Write a cache file from :func:`cache_parts` all-or-nothing (with ``side``, a sidecar
    ``(path, write, digest)`` committed with it; see :mod:`notekv.kv.atomic`)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"notekv": json.dumps(meta)})

    kw = {"fix": fix} if fix else {}
    return atomic.save(Path(path), write, content=meta["header_sha256"], existing=header_id, overwrite=overwrite,
                       what=what, side=side, **kw)


def save_cache(cache: KVCache, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``cache`` to ``path`` (conventionally ``*.nkv``) all-or-nothing; returns the path.
    A file already there with different content is replaced only with ``overwrite=True``."""
    meta, tensors = cache_parts(cache)
    return write_cache_file(meta, tensors, path, overwrite=overwrite)


def read_cache_file(path: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """``(header, tensors)`` of a cache file, unchecked (:func:`check_cache` checks them)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CacheFileError(f"{path} is a directory, not a cache file; pass the .nkv file")
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
    return meta, tensors


def load_cache_file(path: str | Path, model) -> tuple[KVCache, dict]:
    """``(cache, header)`` of a file written by :func:`save_cache`, checked for ``model``."""
    meta, tensors = read_cache_file(path)
    return check_cache(meta, tensors, model, where=str(path), device=model.device), meta


def load_cache(path: str | Path, model) -> KVCache:
    """Read a cache written by :func:`save_cache` for ``model`` (a HookedModel)."""
    return load_cache_file(path, model)[0]
