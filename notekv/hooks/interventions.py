"""Interventions as frozen, serializable data.

An intervention says *what* to do at *which* site and positions; the HookLayer alone applies
it. Every intervention round-trips through JSON (:func:`save` / :func:`load`); tensors travel
in a safetensors side file keyed by their JSON path, so loading never executes code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .positions import Selector, as_selector, selector_from_json
from .sites import Site, site


def _site(s) -> Site:
    return site(s)


def _layers(layers) -> tuple[int, ...] | str:
    if layers is None or layers == "all":
        return "all"
    if isinstance(layers, int):
        return (layers,)
    return tuple(int(l) for l in layers)


def _heads(heads) -> tuple[int, ...] | None:
    if heads is None:
        return None
    if isinstance(heads, int):
        return (heads,)
    return tuple(int(h) for h in heads)


class Intervention:
    """Base class. Subclasses are frozen dataclasses with a ``site`` or ``layers`` field."""

    def sites(self, n_layers: int) -> list[Site]:
        """The sites whose hooks this intervention needs."""
        return [self.site]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Collect(Intervention):
    """Record the activation at ``site`` (optionally only ``at`` positions)."""

    site: Site
    at: Selector | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", _site(self.site))
        object.__setattr__(self, "at", None if self.at is None else as_selector(self.at))


@dataclass(frozen=True)
class Patch(Intervention):
    """Replace the activation at ``site`` and positions ``at`` with ``source``'s.

    ``source``: a :class:`~notekv.hooks.run.Run` that collected the site (indexed by
    absolute slot), or a tensor shaped like the site's full activation or, for a single
    position set, ``[..., len(at), ...]`` along the position axis.
    """

    site: Site
    source: Any
    at: Selector | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", _site(self.site))
        object.__setattr__(self, "at", None if self.at is None else as_selector(self.at))


@dataclass(frozen=True)
class Ablate(Intervention):
    """Zero-, mean- or resample-ablate ``site`` at ``at``.

    ``mean``: the mean of ``reference``'s activation over batch and positions (over the
    current activation's positions when no reference is given). ``resample``: the reference's
    activation at the same positions from a batch row drawn with ``seed``.
    """

    site: Site
    kind: str = "zero"
    at: Selector | None = None
    reference: Any = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "site", _site(self.site))
        object.__setattr__(self, "at", None if self.at is None else as_selector(self.at))
        if self.kind not in ("zero", "mean", "resample"):
            raise ValueError(f"Ablate kind {self.kind!r}: choose 'zero', 'mean' or 'resample'")
        if self.kind == "resample" and self.reference is None:
            raise ValueError("Ablate(kind='resample') needs reference=Run (or a tensor) to draw from")


@dataclass(frozen=True)
class Steer(Intervention):
    """Add ``scale * vector`` to ``site`` at ``at`` (every position of every forward by default).

    ``vector`` broadcasts against one position's activation (``[d_model]`` for residual
    sites, ``[H, D]`` or ``[D]`` with a head for head-split sites).
    """

    site: Site
    vector: torch.Tensor
    scale: float = 1.0
    at: Selector | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", _site(self.site))
        object.__setattr__(self, "at", None if self.at is None else as_selector(self.at))


@dataclass(frozen=True)
class Knockout(Intervention):
    """Forbid queries at ``dst`` from reading keys at ``src`` (additive -inf before softmax).

    ``layers``: "all" or layer indices; ``heads``: query heads (None = all). Applied by
    editing the attention mask the layer receives, so the model's own kernel still runs.
    """

    src: Selector
    dst: Selector
    layers: tuple[int, ...] | str = "all"
    heads: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "src", as_selector(self.src))
        object.__setattr__(self, "dst", as_selector(self.dst))
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "heads", _heads(self.heads))

    def layer_list(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layers == "all" else list(self.layers)

    def sites(self, n_layers: int) -> list[Site]:
        return [Site("attn.scores", l) for l in self.layer_list(n_layers)]


@dataclass(frozen=True)
class KVPatch(Intervention):
    """Overwrite cache slots ``at`` with ``source``'s keys and/or values as they are stored.

    ``source``: a Run with a cache, a ``DynamicCache``, or anything with
    ``.layers[l].keys/.values``. ``which``: "k", "v" or "kv"; ``heads``: KV heads. Slots
    already in the cache (a decode step after prefill) are patched in the working copy,
    slots computed in this forward are patched before attention reads them.
    """

    source: Any
    at: Selector | None = None
    layers: tuple[int, ...] | str = "all"
    heads: tuple[int, ...] | None = None
    which: str = "kv"

    def __post_init__(self):
        object.__setattr__(self, "at", None if self.at is None else as_selector(self.at))
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "heads", _heads(self.heads))
        if self.which not in ("k", "v", "kv"):
            raise ValueError(f"KVPatch which={self.which!r}: choose 'k', 'v' or 'kv'")

    def layer_list(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layers == "all" else list(self.layers)

    def sites(self, n_layers: int) -> list[Site]:
        return [Site(f"kv.{w}", l) for l in self.layer_list(n_layers) for w in self.which]


@dataclass(frozen=True)
class Hook(Intervention):
    """A user function ``fn(tensor, *, hook) -> tensor | None`` at ``site`` (not serializable).

    ``hook`` is a :class:`~notekv.hooks.layer.HookContext` (site, slots of this forward, step).
    Returning None keeps in-place changes; returning a tensor replaces the activation.
    """

    site: Site
    fn: Callable = field(compare=False)

    def __post_init__(self):
        object.__setattr__(self, "site", _site(self.site))


SERIALIZABLE = {c.__name__: c for c in (Collect, Patch, Ablate, Steer, Knockout, KVPatch)}


def _encode(value, path: str, tensors: dict[str, torch.Tensor], memo: dict[int, dict]):
    """JSON for ``value``; tensors go to ``tensors``. An object met twice is stored once."""
    if id(value) in memo:
        return memo[id(value)]
    enc = _encode_new(value, path, tensors, memo)
    if isinstance(value, torch.Tensor) or hasattr(value, "acts") or hasattr(value, "get_seq_length"):
        memo[id(value)] = enc
    return enc


def _encode_new(value, path: str, tensors: dict[str, torch.Tensor], memo: dict[int, dict]):
    from .run import Run  # local: run imports this module

    if isinstance(value, Site):
        return {"site": str(value)}
    if isinstance(value, Selector):
        return {"selector": value.to_json()}
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous().cpu()
        return {"tensor": path}
    if isinstance(value, Run):
        for key, t in value.acts.items():
            tensors[f"{path}/acts/{key}"] = t.detach().contiguous().cpu()
        if value.kv is not None:
            for l, layer in enumerate(value.kv.layers):
                tensors[f"{path}/kv/{l}/k"] = layer.keys.detach().contiguous().cpu()
                tensors[f"{path}/kv/{l}/v"] = layer.values.detach().contiguous().cpu()
        return {"run": path, "sites": list(value.acts), "kv_layers": len(value.kv.layers) if value.kv else 0}
    if hasattr(value, "layers") and hasattr(value, "get_seq_length"):  # a transformers cache
        for l, layer in enumerate(value.layers):
            tensors[f"{path}/kv/{l}/k"] = layer.keys.detach().contiguous().cpu()
            tensors[f"{path}/kv/{l}/v"] = layer.values.detach().contiguous().cpu()
        return {"cache": path, "kv_layers": len(value.layers)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{path}/{i}", tensors, memo) for i, v in enumerate(value)]}
    if callable(value):
        raise TypeError(f"{path}: a Python function cannot be serialized (Hook and Where are runtime-only)")
    return {"value": value}


def _decode(enc: dict, tensors: dict[str, torch.Tensor], memo: dict[str, object]):
    key = enc.get("run") or enc.get("cache")
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
    if "run" in enc:
        p = enc["run"]
        acts = {s: tensors[f"{p}/acts/{s}"] for s in enc["sites"]}
        kv = cache_from_tensors(tensors, p, enc["kv_layers"]) if enc["kv_layers"] else None
        return Run(logits=None, acts=acts, kv=kv)
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
            raise TypeError(f"{name} is runtime-only and cannot be serialized")
        items.append({"type": name, **{
            f.name: _encode(getattr(iv, f.name), f"{i}/{f.name}", tensors, memo) for f in fields(iv)
        }})
    return {"format": "notekv.interventions/1", "interventions": items}, tensors


def from_json(doc: dict, tensors: dict[str, torch.Tensor]) -> list[Intervention]:
    if doc.get("format") != "notekv.interventions/1":
        raise ValueError(f"not a notekv interventions document (format={doc.get('format')!r})")
    out = []
    memo: dict[str, object] = {}
    for item in doc["interventions"]:
        cls = SERIALIZABLE.get(item["type"])
        if cls is None:
            raise ValueError(f"unknown intervention type {item['type']!r}; known: {sorted(SERIALIZABLE)}")
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
    doc = json.loads(path.read_text())
    side = Path(str(path) + ".safetensors")
    tensors = load_file(str(side)) if side.exists() else {}
    return from_json(doc, tensors)
