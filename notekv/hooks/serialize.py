"""Interventions to JSON and back: tensors travel in a safetensors side file keyed by their
JSON path, so loading never executes code. A Run source keeps its collected activations and
its cache; a KVCache source keeps its per-slot metadata and fingerprint."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError, InputTypeError
from .interventions import Ablate, Collect, Intervention, KVPatch, Knockout, Patch, Steer
from .positions import Selector, selector_from_json
from .sites import Site, site


SERIALIZABLE = {c.__name__: c for c in (Collect, Patch, Ablate, Steer, Knockout, KVPatch)}


def _encode(value, path: str, tensors: dict[str, torch.Tensor], memo: dict[int, dict]):
    """JSON for ``value``; tensors go to ``tensors``. An object met twice is stored once."""
    if id(value) in memo:
        return memo[id(value)]
    enc = _encode_new(value, path, tensors, memo)
    if not isinstance(value, (str, int, float, bool, type(None), tuple, Site, Selector)):
        memo[id(value)] = enc
    return enc


def _put_cache(cache, path: str, tensors: dict[str, torch.Tensor]) -> dict:
    from ..kv.store import cache_parts

    meta, parts = cache_parts(cache)
    for k, t in parts.items():
        tensors[f"{path}/{k}"] = t
    return meta


def _get_cache(meta: dict, path: str, tensors: dict[str, torch.Tensor]):
    from ..kv.store import cache_from_parts

    names = ("keys", "values", "positions", "token_ids", "origin_keys", "origin_positions")
    return cache_from_parts(meta, {k: tensors[f"{path}/{k}"] for k in names if f"{path}/{k}" in tensors})


def _encode_new(value, path: str, tensors: dict[str, torch.Tensor], memo: dict[int, dict]):
    from transformers.cache_utils import Cache

    from ..kv import KVCache
    from .run import Run

    if isinstance(value, Site):
        return {"site": str(value)}
    if isinstance(value, Selector):
        return {"selector": value.to_json()}
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous().cpu()
        return {"tensor": path}
    if isinstance(value, KVCache):
        return {"kvcache": path, "meta": _put_cache(value, path, tensors)}
    if isinstance(value, Run):
        for key, t in value.acts.items():
            tensors[f"{path}/acts/{key}"] = t.detach().contiguous().cpu()
        kv = _put_cache(value.kv, f"{path}/kv", tensors) if value.has_kv else None
        return {"run": path, "sites": list(value.acts), "kv": kv, "fingerprint": value.fingerprint}
    if isinstance(value, Cache):  # a transformers cache: stored as its layers' tensors
        for l, layer in enumerate(value.layers):
            tensors[f"{path}/kv/{l}/k"] = layer.keys.detach().contiguous().cpu()
            tensors[f"{path}/kv/{l}/v"] = layer.values.detach().contiguous().cpu()
        return {"cache": path, "kv_layers": len(value.layers)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{path}/{i}", tensors, memo) for i, v in enumerate(value)]}
    if callable(value):
        raise InputTypeError(f"{path}: a Python function cannot be serialized (Hook and Where are runtime-only)")
    return {"value": value}


def _decode(enc: dict, tensors: dict[str, torch.Tensor], memo: dict[str, object]):
    key = enc.get("run") or enc.get("cache") or enc.get("kvcache")
    if key is not None and key in memo:
        return memo[key]
    out = _decode_new(enc, tensors, memo)
    if key is not None:
        memo[key] = out
    return out


def _decode_new(enc: dict, tensors: dict[str, torch.Tensor], memo: dict[str, object]):
    from .run import Run, cache_from_tensors

    if "site" in enc:
        return site(enc["site"])
    if "selector" in enc:
        return selector_from_json(enc["selector"])
    if "tensor" in enc:
        return tensors[enc["tensor"]]
    if "kvcache" in enc:
        return _get_cache(enc["meta"], enc["kvcache"], tensors)
    if "run" in enc:
        p = enc["run"]
        acts = {s: tensors[f"{p}/acts/{s}"] for s in enc["sites"]}
        kv = _get_cache(enc["kv"], f"{p}/kv", tensors) if enc.get("kv") else None
        return Run(logits=None, acts=acts, kv=kv, fingerprint=enc.get("fingerprint"))
    if "cache" in enc:
        return cache_from_tensors(tensors, enc["cache"], enc["kv_layers"])
    if "tuple" in enc:
        return tuple(_decode(v, tensors, memo) for v in enc["tuple"])
    return enc["value"]


def to_json(interventions: Sequence[Intervention]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json_dict, tensors)`` describing ``interventions``; tensors keyed by JSON path."""
    tensors: dict[str, torch.Tensor] = {}
    memo: dict[int, dict] = {}
    items = []
    for i, iv in enumerate(interventions):
        name = type(iv).__name__
        if name not in SERIALIZABLE:
            raise InputTypeError(f"{name} is runtime-only and cannot be serialized")
        items.append({"type": name, **{
            f.name: _encode(getattr(iv, f.name), f"{i}/{f.name}", tensors, memo) for f in fields(iv)
        }})
    return {"format": "notekv.interventions/1", "interventions": items}, tensors


def from_json(doc: dict, tensors: dict[str, torch.Tensor]) -> list[Intervention]:
    if doc.get("format") != "notekv.interventions/1":
        raise InputError(f"not a notekv interventions document (format={doc.get('format')!r})")
    out = []
    memo: dict[str, object] = {}
    for item in doc["interventions"]:
        cls = SERIALIZABLE.get(item["type"])
        if cls is None:
            raise InputError(f"unknown intervention type {item['type']!r}; known: {sorted(SERIALIZABLE)}")
        kwargs = {k: _decode(v, tensors, memo) for k, v in item.items() if k != "type"}
        out.append(cls(**kwargs))
    return out


def save(interventions: Sequence[Intervention], path: str | Path) -> None:
    """Write ``path`` (JSON) and ``path`` + ``.safetensors`` (its tensors)."""
    from safetensors.torch import save_file

    doc, tensors = to_json(interventions)
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1))
    save_file(tensors, str(path) + ".safetensors")


def load(path: str | Path) -> list[Intervention]:
    """Read interventions written by :func:`save` (no code is executed)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"path={str(path)!r}: not a notekv interventions document ({e}); pass a file written "
                         "by notekv.save_interventions") from None
    if not isinstance(doc, dict):
        raise InputError(f"path={str(path)!r}: not a notekv interventions document (a JSON {type(doc).__name__})")
    side = Path(str(path) + ".safetensors")
    tensors = load_file(str(side)) if side.exists() else {}
    return from_json(doc, tensors)
