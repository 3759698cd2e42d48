"""Interventions as frozen, serializable data, each owning its operation.

An intervention says *what* to do at *which* site and positions. ``compile(model)`` turns it
into ``(site, op)`` pairs for a :class:`~notekv.hooks.plan.Plan`; the executors (native hook
layer, TransformerLens, nnsight) only run plans, so a new intervention is one class here.
``op(tensor, ctx)`` sees the activation in notekv's layout (``[B, S, d]`` residual,
``[B, H, S, D]`` head-split, ``[B, H, Sq, Sk]`` attention maps). Positions are absolute slots
(see :mod:`notekv.hooks.positions`); :class:`~notekv.PerRow` gives each batch row its own.
Every intervention but :class:`Hook` round-trips through JSON (:mod:`notekv.hooks.serialize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .plan import Cells, HookContext, PlanError
from .positions import Selector, as_selector
from .sites import Site, SiteError, site
from .sitemap import MASK_SITE
from ..errors import InputError, InputTypeError
from .positions import SlotError


class SourceError(InputError, TypeError):
    """A patch or ablation source that cannot give the activation asked of it (wrong kind of
    object, or a Run that did not collect the site)."""


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


def _at(at) -> Selector | None:
    return None if at is None else as_selector(at)


def _layer_list(layers, n_layers: int, owner: str) -> list[int]:
    out = list(range(n_layers)) if layers == "all" else list(layers)
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise SiteError(f"{owner}: layer {bad[0]} out of range, the model has {n_layers} layers (0..{n_layers - 1})")
    return out


def _head_list(heads, n: int, kind: str, owner: str) -> list[int] | None:
    if heads is None:
        return None
    bad = [h for h in heads if not 0 <= h < n]
    if bad:
        raise SiteError(f"{owner}: head {bad[0]} out of range, the model has {n} {kind} (0..{n - 1})")
    return list(heads)


# ---------------------------------------------------------------------- sources
def check_source_model(source, model, what: str) -> None:
    fp = getattr(source, "fingerprint", None)
    if fp and dict(fp) != dict(model.fingerprint):
        from ..kv import CacheMismatchError

        raise CacheMismatchError(
            f"{what}: the source was computed by another model ({fp}); {model.name} is {model.fingerprint}. "
            "Recompute the source with this model."
        )


def site_source(source, s: Site, model) -> torch.Tensor:
    """The full activation of whole site ``s`` in ``source``: a tensor, a Run that collected
    it, or (for ``attn.k``/``attn.v``/``kv.*``) any cache-like source (a Run, a KVCache or a
    transformers cache, converted once by :func:`~notekv.hooks.run.as_kvcache`)."""
    from .run import Run

    if isinstance(source, torch.Tensor):
        return source
    key = str(s.whole)
    if isinstance(source, Run):
        check_source_model(source, model, f"source of {s}")
        if key in source.acts:
            return source.acts[key]
    if s.name in ("attn.k", "attn.v", "kv.k", "kv.v"):
        return kv_source(source, s.layer, "k" if s.name.endswith("k") else "v", model)
    if isinstance(source, Run):
        raise SourceError(f"the source Run has no activation for {key}; collect it first: "
                          f"model.run(prompt, collect=[{key!r}])")
    raise SourceError(f"source of {s}: a {type(source).__name__} cannot be its source; the source must be a Run "
                      "that collected the site or a tensor (a KVCache holds keys and values only)")


def kv_source(source, layer: int, which: str, model) -> torch.Tensor:
    """Keys (``which="k"``) or values ``[B, H_kv, S, D]`` of ``layer`` in any cache-like source."""
    return _kv_or_refuse(source, model).layer_kv(layer)[0 if which == "k" else 1]


def _kv_or_refuse(source, model):
    from .run import as_kvcache

    kv = as_kvcache(source, model, "KVPatch source")
    if kv is None:
        raise SourceError("KVPatch source: the transformers cache is empty; pass a cache that holds the slots")
    return kv


def _source_rows(src: torch.Tensor, batch: int, cells: Cells, what: str) -> torch.Tensor:
    if src.shape[0] == batch and batch > 1:
        return cells.rows
    if src.shape[0] != 1:
        raise PlanError(f"{what}: the source has {src.shape[0]} batch rows and the forward {batch}; "
                        f"give a source of 1 row (shared) or {batch} rows (one per row)")
    return torch.zeros_like(cells.rows)


def source_start(source) -> int:
    """The absolute slot of a source's first position (a Run continuing a cache starts later)."""
    return int(getattr(source, "start", 0) or 0) if not isinstance(source, torch.Tensor) else 0


def gather_source(src: torch.Tensor, t: torch.Tensor, s: Site, cells: Cells, pos: torch.Tensor,
                  start: int = 0) -> torch.Tensor:
    """``src``'s values at positions ``pos [N]`` (absolute slots; the source's first position
    is slot ``start``) for each cell, shaped like ``t[cells]``. A head site accepts a source
    with or without the head axis."""
    rows = _source_rows(src, t.shape[0], cells, str(s)).to(src.device)
    headless = s.head is not None and src.dim() == t.dim() - 1
    pos_dim = 1 if headless or s.pos_dim == 1 else 2
    n = src.shape[pos_dim]
    pos = pos - start
    if len(pos) and (int(pos.max()) >= n or int(pos.min()) < 0):
        bad = int(pos.max()) if int(pos.max()) >= n else int(pos.min())
        raise SlotError(f"{s}: the source covers slots {start}..{start + n - 1} but slot {bad + start} was "
                         "requested; patch from a source prompt that covers the target positions")
    pos = pos.to(src.device)
    if pos_dim == 1:
        return src[rows, pos]
    return src[rows, :, pos] if s.head is None else src[rows, s.head, pos]


def _check_source_shape(src: torch.Tensor, t: torch.Tensor, s: Site, headless: bool, pos_dim: int) -> None:
    """A source must match the activation outside the batch and position axes."""
    want = list(t.shape)
    if headless:
        del want[1]
    got = list(src.shape)
    if len(got) != len(want) or [g for i, g in enumerate(got) if i not in (0, pos_dim)] != \
            [w for i, w in enumerate(want) if i not in (0, pos_dim)]:
        raise PlanError(f"{s}: the source has shape {tuple(src.shape)} but the activation is {tuple(t.shape)} "
                        "(batch and position axes may differ); patch from the same site of the same model")


class Intervention:
    """Base class. ``compile(model)`` returns the ``(site, op)`` pairs of its plan steps."""

    #: The key under which a Run keeps what this intervention collects (None: it collects nothing).
    collects: str | None = None

    def compile(self, model) -> list[tuple[Site, Callable]]:
        raise NotImplementedError


class SiteIntervention(Intervention):
    """An intervention at one ``site`` and positions ``at`` (dataclass fields of the subclass).

    Subclasses that rewrite the activation give ``_writer(model)``: a function
    ``write(out, t, cells, idx, ctx)`` that sets ``out[idx]`` (a clone of ``t``) for the cells
    of ``at`` present in this forward; :meth:`compile` does the rest.
    """

    def __post_init__(self):
        object.__setattr__(self, "site", site(self.site))
        object.__setattr__(self, "at", _at(self.at))

    def _writer(self, model) -> Callable:
        raise NotImplementedError

    def compile(self, model):
        s = self.site
        write = self._writer(model)

        def op(t, ctx: HookContext):
            cells = ctx.cells(self, self.at)
            if not len(cells):
                return None
            out = t.clone()
            write(out, t, cells, cells.index(s, t.device), ctx)
            return out
        return [(s, op)]


@dataclass(frozen=True)
class Collect(SiteIntervention):
    """Record the activation at ``site`` (optionally only ``at`` positions, the same for every row)."""

    site: Site
    at: Selector | None = None

    @property
    def collects(self) -> str:
        return str(self.site)

    def compile(self, model):
        s = self.site

        def op(t, ctx: HookContext):
            x = t.detach()
            if self.at is not None:
                slots = ctx.resolve(self, self.at)
                if isinstance(slots, tuple):
                    raise PlanError(f"Collect at {s}: PerRow positions are for interventions that write; "
                                    "collect the union and index the rows you need")
                x = x.index_select(s.pos_dim, ctx.local(slots).to(x.device))
            if s.head is not None:
                x = x[:, s.head]
            ctx.hook_layer.sink(str(s), x.clone())
        return [(s, op)]


@dataclass(frozen=True)
class Patch(SiteIntervention):
    """Replace the activation at ``site`` and positions ``at`` with ``source``'s.

    ``source``: a :class:`~notekv.hooks.run.Run` that collected the site (indexed by absolute
    slot; one row shared by every batch row, or one row per batch row), a
    :class:`~notekv.KVCache` for ``attn.k``/``attn.v``, or a tensor shaped like the site's full
    activation or, for one position set, ``[..., len(at), ...]`` along the position axis.
    """

    site: Site
    source: Any
    at: Selector | None = None

    def _writer(self, model):
        s = self.site

        def write(out, t, cells, idx, ctx):
            src = site_source(self.source, s.whole, model)
            slots = ctx.resolve(self, self.at)
            pos, start = cells.slots, source_start(self.source)
            headless = s.head is not None and src.dim() == t.dim() - 1
            pos_dim = 1 if headless or s.pos_dim == 1 else 2
            _check_source_shape(src, t, s, headless, pos_dim)
            if self.at is None and ctx.step == 0 and (start, src.shape[pos_dim]) != (int(ctx.slots[0]), len(ctx.slots)):
                raise PlanError(
                    f"Patch at {s} without at=: the source covers slots {start}..{start + src.shape[pos_dim] - 1} "
                    f"but this forward has {int(ctx.slots[0])}..{int(ctx.slots[-1])}; give at= the positions to "
                    "patch, or a source of the same prompt length")
            if isinstance(self.source, torch.Tensor) and isinstance(slots, list) and src.shape[pos_dim] == len(slots):
                where = {p: i for i, p in enumerate(slots)}
                pos = torch.tensor([where[int(p)] for p in cells.slots], dtype=torch.long)
            out[idx] = gather_source(src, t, s, cells, pos, start).to(out)
        return write


@dataclass(frozen=True)
class Ablate(SiteIntervention):
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
        super().__post_init__()
        if self.kind not in ("zero", "mean", "resample"):
            raise InputError(f"Ablate kind {self.kind!r}: choose 'zero', 'mean' or 'resample'")
        if self.kind == "resample" and self.reference is None:
            raise InputError("Ablate(kind='resample') needs reference=Run (or a tensor) to draw from")

    def _writer(self, model):
        s = self.site
        gen = torch.Generator().manual_seed(self.seed)

        def write(out, t, cells, idx, ctx):
            if self.kind == "zero":
                out[idx] = 0
                return
            ref = site_source(self.reference, s.whole, model) if self.reference is not None else t
            if self.kind == "mean":
                m = ref.mean(dim=(0, s.pos_dim))
                out[idx] = (m if s.head is None else m[s.head]).to(out)
            else:
                row = int(torch.randint(ref.shape[0], (1,), generator=gen))
                out[idx] = gather_source(ref[row : row + 1], t, s, cells, cells.slots,
                                         source_start(self.reference)).to(out)
        return write


@dataclass(frozen=True)
class Steer(SiteIntervention):
    """Add ``scale * vector`` to ``site`` at ``at`` (every position of every forward by default).

    ``vector`` broadcasts against one position's activation (``[d_model]`` for residual
    sites, ``[H, D]`` or ``[D]`` for head-split sites, ``[D]`` with a head); with one more
    leading axis (``[B, ...]``) row ``b`` of the forward gets ``vector[b]``.
    """

    site: Site
    vector: torch.Tensor
    scale: float = 1.0
    at: Selector | None = None

    def _writer(self, model):
        s = self.site
        per_position = 2 if s.head_split and s.head is None else 1

        def write(out, t, cells, idx, ctx):
            vec = self.vector.to(out)
            target = out[idx].shape[1:]
            per_row = vec.dim() == per_position + 1
            tail = vec.shape[1:] if per_row else vec.shape
            try:
                torch.broadcast_shapes(tuple(tail), tuple(target))
            except RuntimeError:
                raise PlanError(f"Steer at {s}: a vector of shape {tuple(self.vector.shape)} does not broadcast "
                                f"against one position's activation {tuple(target)}") from None
            if per_row:
                if vec.shape[0] != t.shape[0]:
                    raise PlanError(f"Steer at {s}: a per-row vector has {vec.shape[0]} rows, the forward {t.shape[0]}")
                vec = vec[cells.rows.to(vec.device)]
            out[idx] = out[idx] + self.scale * vec
        return write


@dataclass(frozen=True)
class Knockout(Intervention):
    """Forbid queries at ``dst`` from reading keys at ``src`` (additive -inf before softmax).

    ``layers``: "all" or layer indices; ``heads``: query heads (None = all). Applied by
    editing the attention mask the layer receives, so the model's own kernel still runs.
    ``dst`` may be a :class:`~notekv.PerRow` (one query set per batch row).
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
        return _layer_list(self.layers, n_layers, "Knockout")

    def compile(self, model):
        spec = model.spec
        heads = _head_list(self.heads, spec.n_heads, "query heads", "Knockout")
        head_idx = torch.arange(spec.n_heads) if heads is None else torch.tensor(heads)

        def op(mask, ctx: HookContext):
            src = ctx.resolve(self, self.src, "src")
            if isinstance(src, tuple):
                raise PlanError("Knockout src must be one selector for every row; PerRow goes on dst")
            dst = ctx.cells(self, self.dst, "dst")
            cols = list(range(mask.n_keys)) if src is None else [c for c in src if c < mask.n_keys]
            if len(dst) and cols:
                mask.block(dst.rows, dst.local, head_idx, torch.tensor(cols))
            return None
        return [(Site(MASK_SITE, l), op) for l in self.layer_list(spec.n_layers)]


@dataclass(frozen=True)
class KVPatch(Intervention):
    """Overwrite cache slots ``at`` with ``source``'s keys and/or values as they are stored.

    ``source``: a :class:`~notekv.KVCache`, a Run (its cache) or a transformers cache.
    ``which``: "k", "v" or "kv"; ``heads``: KV heads (None = all). Slots already in the
    cache (a decode step after prefill) are patched in the working copy, slots computed in
    this forward before attention reads them. ``at`` may be a :class:`~notekv.PerRow`, and
    a source with one row per batch row patches each row from its own.
    """

    source: Any
    at: Selector | None = None
    layers: tuple[int, ...] | str = "all"
    heads: tuple[int, ...] | None = None
    which: str = "kv"

    def __post_init__(self):
        object.__setattr__(self, "at", _at(self.at))
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "heads", _heads(self.heads))
        if self.which not in ("k", "v", "kv"):
            raise InputError(f"KVPatch which={self.which!r}: choose 'k', 'v' or 'kv'")

    def layer_list(self, n_layers: int) -> list[int]:
        return _layer_list(self.layers, n_layers, "KVPatch")

    def compile(self, model):
        heads = _head_list(self.heads, model.spec.n_kv_heads, "KV heads", "KVPatch")
        source = _kv_or_refuse(self.source, model)

        def make(layer: int, which: str):
            def op(t, ctx: HookContext):
                src = source.layer_kv(layer)[0 if which == "k" else 1]
                slots = ctx.resolve(self, self.at)
                if slots is None:  # every slot the source holds
                    slots = list(range(min(t.shape[2], src.shape[2])))
                cells = ctx.cells_of(slots)
                if not len(cells):
                    return None
                s = Site(f"kv.{which}", layer)
                rows = cells.rows.to(t.device)
                local = cells.local.to(t.device)
                vals = gather_source(src, t, s, cells, cells.slots)  # [N, H, D]
                if heads is None:
                    t[rows, :, local] = vals.to(t)
                else:
                    h = torch.tensor(heads)
                    t[rows[:, None], h[None, :].to(t.device), local[:, None]] = vals[:, h.to(vals.device)].to(t)
                return None
            return op
        return [(Site(f"kv.{w}", l), make(l, w)) for l in self.layer_list(model.spec.n_layers) for w in self.which]


@dataclass(frozen=True)
class Hook(Intervention):
    """A user function ``fn(tensor, *, hook) -> tensor | None`` at ``site`` (not serializable).

    ``hook`` is a :class:`~notekv.HookContext` (site, slots of this forward, step, batch).
    Returning None keeps in-place changes; returning a tensor replaces the activation.
    """

    site: Site
    fn: Callable = field(compare=False)

    def __post_init__(self):
        object.__setattr__(self, "site", site(self.site))
        if not callable(self.fn):
            raise InputTypeError(f"Hook fn must be callable fn(tensor, *, hook), not {type(self.fn).__name__}")

    def compile(self, model):
        return [(self.site, lambda t, ctx: self.fn(t, hook=ctx))]


__all__ = ["Ablate", "Collect", "Hook", "Intervention", "KVPatch", "Knockout", "Patch", "SiteIntervention", "Steer"]
