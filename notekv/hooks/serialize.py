"""Interventions to JSON and back: tensors travel in a safetensors side file keyed by their
JSON path, so loading never executes code.

A Run source keeps its collected activations (keyed by site), ``start`` (the absolute slot
of its first position), its token ids, its prompt view, its cache and fingerprint; a
KVCache source keeps its per-slot metadata and fingerprint. A cache in the file goes through
:func:`notekv.kv.store.check_cache`, the checks a ``.nkv`` file gets.

:func:`save` writes the JSON and its side file as one all-or-nothing save: the JSON records
the digest of the tensors, its rename commits the pair (see :mod:`notekv.kv.atomic`), and
:func:`load` refuses a side file that does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError, InputTypeError, NotekvError, check_int
from .interventions import Ablate, Collect, Intervention, KVPatch, Knockout, Patch, Steer
from .moe import ExpertKnockout
from .positions import Selector, TokenView, selector_from_json
from .sites import Site, site


SERIALIZABLE = {c.__name__: c for c in (Collect, Patch, Ablate, Steer, Knockout, KVPatch, ExpertKnockout)}
FORMAT = "notekv.interventions/2"
READS = ("notekv.interventions/1", FORMAT)  # /1: no Run start, no tensor digest
CACHE_TENSORS = ("keys", "values", "positions", "token_ids", "origin_keys", "origin_positions")


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


def _get_cache(meta: dict, path: str, ctx: dict):
    from ..kv.store import check_cache

    tensors, model = ctx["tensors"], ctx["model"]
    parts = {k: tensors[f"{path}/{k}"] for k in CACHE_TENSORS if f"{path}/{k}" in tensors}
    return check_cache(meta, parts, model, where=f"{ctx['file']}: the cache at {path!r}",
                       device=None if model is None else model.device)


def _view_json(view: TokenView) -> dict:
    d = {"text": view.text, "ids": list(view.ids), "tokens": list(view.tokens),
         "offsets": [list(o) for o in view.offsets], "start": view.start}
    if view.rows:  # a batch of different texts: one view per row
        d["rows"] = [_view_json(v) for v in view.rows]
    return d


def _view_from_json(d: dict, where: str) -> TokenView:
    if d.get("rows"):
        if not isinstance(d["rows"], list):
            raise InputError(f"{where}: its prompt view's rows are not a list; re-save it")
        return TokenView.batch([_view_from_json(r, where) for r in d["rows"]])
    view = TokenView(str(d["text"]), tuple(int(i) for i in d["ids"]), tuple(str(t) for t in d["tokens"]),
                     tuple((int(a), int(b)) for a, b in d["offsets"]), check_int("view start", d["start"], low=0))
    if not len(view.ids) == len(view.tokens) == len(view.offsets):
        raise InputError(f"{where}: its prompt view's ids, tokens and offsets differ in length; re-save it")
    return view


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
        ids = None
        if isinstance(value.ids, torch.Tensor):
            ids = f"{path}/ids"
            tensors[ids] = value.ids.detach().contiguous().cpu()
        return {"run": path, "sites": list(value.acts), "kv": kv, "fingerprint": value.fingerprint,
                "start": int(value.start), "ids": ids,
                "view": _view_json(value.view) if value.view is not None else None}
    if isinstance(value, Cache):  # a transformers cache: stored as its layers' tensors
        for l, layer in enumerate(value.layers):
            tensors[f"{path}/kv/{l}/k"] = layer.keys.detach().contiguous().cpu()
            tensors[f"{path}/kv/{l}/v"] = layer.values.detach().contiguous().cpu()
        return {"cache": path, "kv_layers": len(value.layers),
                "fingerprint": getattr(value, "_notekv_fingerprint", None)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{path}/{i}", tensors, memo) for i, v in enumerate(value)]}
    if callable(value):
        raise InputTypeError(f"{path}: a Python function cannot be serialized (Hook and Where are runtime-only)")
    return {"value": value}


def _decode(enc: dict, ctx: dict):
    memo = ctx["memo"]
    key = enc.get("run") or enc.get("cache") or enc.get("kvcache")
    if key is not None and key in memo:
        return memo[key]
    out = _decode_new(enc, ctx)
    if key is not None:
        memo[key] = out
    return out


def _decode_new(enc: dict, ctx: dict):
    from .run import Run, cache_from_tensors

    tensors, model = ctx["tensors"], ctx["model"]
    if "site" in enc:
        return site(enc["site"])
    if "selector" in enc:
        return selector_from_json(enc["selector"])
    if "tensor" in enc:
        return tensors[enc["tensor"]]
    if "kvcache" in enc:
        return _get_cache(enc["meta"], enc["kvcache"], ctx)
    if "run" in enc:
        p = enc["run"]
        if not isinstance(enc["sites"], list) or not all(isinstance(s, str) for s in enc["sites"]):
            raise InputError(f"{ctx['file']}: the Run at {p!r}: 'sites' must be a list of site names; re-save it")
        acts = {s: tensors[f"{p}/acts/{s}"] for s in enc["sites"]}
        kv = _get_cache(enc["kv"], f"{p}/kv", ctx) if enc.get("kv") else None
        fp = enc.get("fingerprint")
        if fp is not None and not isinstance(fp, dict):
            raise InputError(f"{ctx['file']}: the Run at {p!r} has a fingerprint of type {type(fp).__name__}, not "
                             "an object; re-save it")
        if kv is not None and fp is not None and dict(fp) != kv.fingerprint:
            raise InputError(f"{ctx['file']}: the Run at {p!r} and its cache carry different fingerprints (an "
                             "edited file); re-save it")
        if model is not None and fp is not None and dict(fp) != dict(model.fingerprint):
            from ..kv import CacheMismatchError

            raise CacheMismatchError(f"{ctx['file']}: the Run at {p!r} was computed by another model ({fp}); "
                                     f"{model.name} is {model.fingerprint}. Recompute it with this model.")
        ids = tensors[enc["ids"]] if enc.get("ids") else None
        view = _view_from_json(enc["view"], f"{ctx['file']}: the Run at {p!r}") if enc.get("view") else None
        run = Run(logits=None, acts=acts, kv=kv, ids=ids, view=view, fingerprint=fp)
        run.start = check_int("Run start", enc.get("start", 0), low=0)
        if kv is not None and run.start > len(kv):
            raise InputError(f"{ctx['file']}: the Run at {p!r} starts at slot {run.start} but its cache holds "
                             f"{len(kv)} slots (an edited file); re-save it")
        return run
    if "cache" in enc:
        cache = cache_from_tensors(tensors, enc["cache"], check_int("kv_layers", enc["kv_layers"], low=0))
        if enc.get("fingerprint") is not None:
            cache._notekv_fingerprint = dict(enc["fingerprint"])
        return cache
    if "tuple" in enc:
        return tuple(_decode(v, ctx) for v in enc["tuple"])
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
    return {"format": FORMAT, "interventions": items}, tensors


def from_json(doc: dict, tensors: dict[str, torch.Tensor], model=None, *, where: str = "the interventions document"
              ) -> list[Intervention]:
    """The interventions ``doc`` describes (its tensors in ``tensors``). Every cache in it goes
    through :func:`notekv.kv.store.check_cache`: against ``model`` now, or else when it first
    meets a model. A malformed document raises :class:`InputError` naming ``where``."""
    if not isinstance(doc, dict) or doc.get("format") not in READS:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise InputError(f"not a notekv interventions document (format={fmt!r}); pass a file written by "
                         "notekv.save_interventions")
    items = doc.get("interventions")
    if not isinstance(items, list):
        raise InputError(f"{where}: 'interventions' is missing or not a list; re-save the file")
    out = []
    ctx = {"tensors": tensors, "model": model, "memo": {}, "file": where}
    for i, item in enumerate(items):
        cls = SERIALIZABLE.get(item.get("type")) if isinstance(item, dict) else None
        if cls is None:
            got = item.get("type") if isinstance(item, dict) else item
            raise InputError(f"{where}: unknown intervention type {got!r} (item {i}); known: {sorted(SERIALIZABLE)}")
        try:
            kwargs = {k: _decode(v, ctx) for k, v in item.items() if k != "type"}
            out.append(cls(**kwargs))
        except NotekvError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise InputError(f"{where}: intervention {i} ({cls.__name__}) is malformed ({type(err).__name__}: "
                             f"{err}); re-save it with notekv.save_interventions") from None
    return out


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's name, dtype, shape and bytes."""
    from ..kv.store import _digest

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape), _digest(t)]).encode())
    return h.hexdigest()


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tensor on its own storage (a Run's ids and its cache's token ids
    may share one; safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _side(path: Path) -> Path:
    return Path(str(path) + ".safetensors")


def save(interventions: Sequence[Intervention], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``path`` (JSON) and ``path`` + ``.safetensors`` (its tensors) as one
    all-or-nothing save; a file already at ``path`` with different content is replaced only
    with ``overwrite=True``. Returns ``path``."""
    from safetensors.torch import save_file

    from ..kv import atomic

    doc, tensors = to_json(interventions)
    path = Path(path)
    digest = _tensors_digest(tensors)
    doc["tensors_sha256"] = digest
    data = json.dumps(doc, indent=1).encode()

    def existing(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return atomic.save(path, lambda tmp: tmp.write_bytes(data), content=hashlib.sha256(data).hexdigest(),
                       existing=existing, overwrite=overwrite, what="path",
                       side=(_side(path), lambda tmp: save_file(_own_storage(tensors), str(tmp)), digest))


def _read_tensors(side: Path, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(side))
    except Exception as err:  # safetensors raises its own error types for a bad header/body
        raise InputError(f"path={str(path)!r}: its tensors file {side} is not readable (truncated or corrupt: "
                         f"{err}); re-save the interventions") from None


def load(path: str | Path, model=None) -> list[Intervention]:
    """Read interventions written by :func:`save` (no code is executed). Every cache in the
    file (a KVCache source, a Run's cache) gets the checks of a ``.nkv`` file: against
    ``model`` here when it is given, else when the cache first meets a model."""
    from ..kv.atomic import adopt, committed_sidecar

    path = Path(path)
    if path.is_dir():
        raise InputError(f"path={str(path)!r} is a directory; pass the interventions JSON file")
    if not path.is_file():
        raise InputError(f"path={str(path)!r}: no such file; pass a file written by notekv.save_interventions")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"path={str(path)!r}: not a notekv interventions document ({e}); pass a file written "
                         "by notekv.save_interventions") from None
    if not isinstance(doc, dict):
        raise InputError(f"path={str(path)!r}: not a notekv interventions document (a JSON {type(doc).__name__})")
    side = _side(path)
    if doc.get("format") != FORMAT:  # an older file: no digest to pair it with its tensors
        tensors = _read_tensors(side, path) if side.exists() else {}
        return from_json(doc, tensors, model, where=str(path))
    want = doc.get("tensors_sha256")
    if not (isinstance(want, str) and len(want) == 64):
        raise InputError(f"path={str(path)!r}: its 'tensors_sha256' is {want!r}, not the sha256 of its tensors "
                         "(an edited file); re-save the interventions")
    tensors = _read_tensors(side, path) if side.is_file() else None
    got = None if tensors is None else _tensors_digest(tensors)
    if got != want:
        found = committed_sidecar(side, want)
        if found is not None:
            waiting = _read_tensors(found, path)
            if _tensors_digest(waiting) == want:
                tensors, got = waiting, want
                adopt(found, side)
    if tensors is None:
        raise InputError(f"path={str(path)!r}: its tensors file {side} is missing; save both with "
                         "notekv.save_interventions")
    if got != want:
        raise InputError(f"path={str(path)!r}: its tensors file {side} does not match it (the sha256 differs: an "
                         "edited file or one of another save); re-save the interventions")
    return from_json(doc, tensors, model, where=str(path))
