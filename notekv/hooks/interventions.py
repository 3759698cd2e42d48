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

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .plan import Cells, HookContext, PlanError
from .positions import Selector, as_selector
from .layouts import module_view, to_site
from .sites import Site, SiteError, is_tl_name, shape_of, site
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


def _layer_list(layers, n_layers: int, owner: str, every=None) -> list[int]:
    """The layers of ``layers``: "all" is ``every`` (default: every layer; the attention
    layers for an attention edit on a hybrid)."""
    out = (list(range(n_layers)) if every is None else list(every)) if layers == "all" else list(layers)
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
    if is_tl_cache(source):
        return tl_cache_source(source, s.whole, model)
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


def is_tl_cache(source) -> bool:
    """Whether ``source`` is a TransformerLens ``ActivationCache`` (checked by duck type:
    TransformerLens is never imported for it)."""
    return type(source).__name__ == "ActivationCache" and isinstance(getattr(source, "cache_dict", None), dict)


def tl_cache_source(cache, s: Site, model) -> torch.Tensor:
    """Whole site ``s`` from a TransformerLens ``ActivationCache`` (``bridge.run_with_cache``),
    read under the model's TransformerLens name of ``s`` and converted to notekv's layout
    (``[B, S, H, D]`` -> ``[B, H, S, D]`` where TransformerLens swaps the axes)."""
    from .sitemap import UnsupportedError

    try:
        name = model.sitemap.tl_name(s)
    except UnsupportedError as err:
        raise SourceError(f"source of {s}: a TransformerLens ActivationCache cannot hold it ({err}); patch it from "
                          "a Run of model.run") from None
    if name not in cache.cache_dict:
        raise SourceError(f"source of {s}: the ActivationCache has no {name!r}; cache it "
                          f"(bridge.run_with_cache(tokens, names_filter=[{name!r}, ...])) or patch from a Run")
    return model.sitemap.to_notekv(s, cache.cache_dict[name], "tl")


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
                    raise PlanError(f"Collect at {s}: {self.at!r} names different slots in different batch rows "
                                    "(PerRow positions, or a text selector on a batch of different texts) and a "
                                    "collection keeps one position set; collect without at= and index the rows "
                                    "you need")
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
    :class:`~notekv.KVCache` for ``attn.k``/``attn.v``, a TransformerLens ``ActivationCache``
    (``bridge.run_with_cache``; read under the site's TransformerLens name and converted to
    notekv's layout), or a tensor shaped like the site's
    activation over the prompt (the forward's tokens; or over every slot from 0, the cache
    included) or, for one position set, ``[..., len(at), ...]`` along the position axis; a
    tensor of any other length is refused. A tensor source is in notekv's layout: convert a
    value read elsewhere with ``model.sitemap.to_notekv(site, value, "nnsight")`` (an nnsight
    saved module value) or ``"tl"`` (one TransformerLens hook's tensor).
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
            if isinstance(self.source, torch.Tensor):
                pos, start = self._tensor_positions(src.shape[pos_dim], slots, cells, ctx)
            if self.at is None and ctx.step == 0 and (start, src.shape[pos_dim]) != (int(ctx.slots[0]), len(ctx.slots)):
                raise PlanError(
                    f"Patch at {s} without at=: the source covers slots {start}..{start + src.shape[pos_dim] - 1} "
                    f"but this forward has {int(ctx.slots[0])}..{int(ctx.slots[-1])}; give at= the positions to "
                    "patch, or a source of the same prompt length")
            out[idx] = gather_source(src, t, s, cells, pos, start).to(out)
        return write

    def _tensor_positions(self, n_src: int, slots, cells: Cells, ctx: HookContext) -> tuple[torch.Tensor, int]:
        """Which entries of a tensor source the cells read, by its length along the position
        axis: one per selected slot (in the selector's order), one per prompt token (the
        source's first entry is the prompt's first slot), or one per slot from slot 0 (the
        cache included). Any other length is refused: it fits no reading of the source."""
        first, n_prompt = ctx.hook_layer.prompt_slots or (int(ctx.slots[0]), len(ctx.slots))
        if self.at is not None and isinstance(slots, list) and n_src == len(slots):
            where = {p: i for i, p in enumerate(slots)}
            return torch.tensor([where[int(p)] for p in cells.slots], dtype=torch.long), 0
        if n_src == n_prompt:
            return cells.slots, first
        if n_src == first + n_prompt:
            return cells.slots, 0
        fits = [f"the selection ({len(slots)} slots)"] if self.at is not None and isinstance(slots, list) else []
        fits.append(f"the prompt ({n_prompt} tokens)")
        if first:
            fits.append(f"every slot from 0, the cache included ({first + n_prompt})")
        raise PlanError(
            f"Patch at {self.site}: the tensor source has {n_src} positions along the position axis, which fits "
            f"{'neither ' + ' nor '.join(fits) if len(fits) > 1 else 'not ' + fits[0]}; give a source of one of these lengths")


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
    sites, ``[H, D]`` or ``[D]`` for head-split sites, ``[D]`` with a head, ``[n_experts, d_model]`` or
    ``[d_model]`` (every expert) for ``moe.experts``); with one more
    leading axis (``[B, ...]``) row ``b`` of the forward gets ``vector[b]``.
    """

    site: Site
    vector: torch.Tensor
    scale: float = 1.0
    at: Selector | None = None

    def _writer(self, model):
        s = self.site
        per_position = 2 if s.head_split and s.head is None or s.name == "moe.experts" else 1

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

    ``layers``: "all" (every attention layer: a hybrid's state-space layers have none, and
    still carry ``src`` to ``dst`` in their recurrent state) or layer indices; ``heads``:
    query heads (None = all). Applied by
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

    def layer_list(self, n_layers: int, every=None) -> list[int]:
        return _layer_list(self.layers, n_layers, "Knockout", every)

    def compile(self, model):
        spec = model.spec
        heads = _head_list(self.heads, spec.n_heads, "query heads", "Knockout")
        head_idx = torch.arange(spec.n_heads) if heads is None else torch.tensor(heads)

        def op(mask, ctx: HookContext):
            src = ctx.resolve(self, self.src, "src")
            if isinstance(src, tuple):
                raise PlanError(f"Knockout src={self.src!r} names different key slots in different batch rows "
                                "(a PerRow, or a text selector on a batch of different texts); src must be one "
                                "slot set for every row (PerRow goes on dst), or run the rows one by one")
            dst = ctx.cells(self, self.dst, "dst")
            cols = list(range(mask.n_keys)) if src is None else [c for c in src if c < mask.n_keys]
            if len(dst) and cols:
                mask.block(dst.rows, dst.local, head_idx, torch.tensor(cols))
            return None
        return [(Site(MASK_SITE, l), op) for l in self.layer_list(spec.n_layers, spec.attention_layers)]


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

    def layer_list(self, n_layers: int, every=None) -> list[int]:
        return _layer_list(self.layers, n_layers, "KVPatch", every)

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
        return [(Site(f"kv.{w}", l), make(l, w)) for l in self.layer_list(model.spec.n_layers, model.spec.attention_layers)
                for w in self.which]


@dataclass(frozen=True)
class Hook(Intervention):
    """A user function ``fn(tensor, hook) -> tensor | None`` at ``site`` (not serializable).

    ``fn`` is written either way: TransformerLens style ``fn(tensor, hook)`` (the second
    parameter under any name) or ``fn(tensor, *, hook)``. ``hook`` is a
    :class:`~notekv.HookContext`: ``hook.name`` (the site as given here), ``hook.layer``
    (callable too: ``hook.layer()``), the slots of this forward, step, batch.
    Returning None keeps in-place changes; returning a tensor replaces the activation.

    Layout: a site given by its notekv name hands ``fn`` notekv's layout (``[B, H, S, D]``
    per head); a site given by its TransformerLens name (``"blocks.3.attn.hook_z"``) hands
    it TransformerLens's (``[B, S, H, D]`` for ``hook_z``, ``hook_q``/``k``/``v``,
    ``hook_rot_q``/``rot_k``), as a view, so in-place edits and a returned tensor in that
    layout both land where TransformerLens would put them, on every executor. A TransformerLens
    name that is not this model's hook of the site (``hook_q`` on a QK-norm model) is a
    :class:`~notekv.SiteError` that says notekv's layout.
    """

    site: Site
    fn: Callable = field(compare=False)

    def __post_init__(self):
        given = self.site.strip() if isinstance(self.site, str) else None
        object.__setattr__(self, "site", site(self.site))
        if not callable(self.fn):
            raise InputTypeError(f"Hook fn must be callable fn(tensor, hook), not {type(self.fn).__name__}")
        #: The site as given (a TransformerLens hook name, or the notekv site string).
        object.__setattr__(self, "name", given if given is not None else str(self.site))
        object.__setattr__(self, "_call", _hook_caller(self.fn))

    @property
    def tl(self) -> bool:
        """Whether the site was given by its TransformerLens name (``fn`` then sees TransformerLens's layout)."""
        return is_tl_name(self.name)

    def compile(self, model):
        call, name = self._call, self.name
        if not self.tl:
            return [(self.site, lambda t, ctx: call(t, replace(ctx, name=name)))]
        s, acc = model.sitemap.tl_hook(name)
        layout, spec = acc.layout, model.spec

        def op(t, ctx: HookContext):
            x = module_view(layout, t)
            new = call(x, replace(ctx, name=name))
            if new is None or new is x:
                return None  # in-place edits of the view live in t
            if isinstance(new, torch.Tensor) and new.shape != x.shape:
                raise PlanError(f"Hook at {name}: returned shape {tuple(new.shape)}, expected {tuple(x.shape)} "
                                f"(TransformerLens's layout of {name}; notekv's {s.whole} is {shape_of(s.whole)})")
            return to_site(layout, new, spec) if isinstance(new, torch.Tensor) else new
        return [(s, op)]


def _hook_caller(fn) -> Callable:
    """``call(tensor, ctx)`` for a hook function taking the context as ``hook=`` (a
    parameter named ``hook``, or ``**kwargs``) or as its second positional parameter."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or extension without a signature: TransformerLens's call
        return lambda t, ctx: fn(t, hook=ctx)
    P = inspect.Parameter
    if any(p.name == "hook" and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) or p.kind == P.VAR_KEYWORD
           for p in params):
        return lambda t, ctx: fn(t, hook=ctx)
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind == P.VAR_POSITIONAL for p in params):
        return lambda t, ctx: fn(t, ctx)
    name = getattr(fn, "__qualname__", type(fn).__name__)
    raise InputTypeError(f"Hook fn {name}{inspect.signature(fn)} cannot take the hook context; write it "
                         "fn(tensor, hook) (TransformerLens style) or fn(tensor, *, hook)")


__all__ = ["Ablate", "Collect", "Hook", "Intervention", "KVPatch", "Knockout", "Patch", "SiteIntervention", "Steer"]
