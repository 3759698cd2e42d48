"""The site map: for one model, where every site lives and how each executor reaches it.

This is the only place a site is resolved to a module. One :class:`Route` per whole site
(no head suffix) maps each registered executor to an :class:`Access` (module, kind, layout)
or to :class:`Unsupported` (the reason it cannot reach the site).

The map is open: each executor registers its own route builder with
:func:`register_executor` (the native hook layer in :mod:`notekv.hooks.layer`, the
TransformerLens and nnsight backends in :mod:`notekv.backends`). A builder is
``build(spec, name, layer) -> Access | Unsupported`` for one site kind and one family
layout; it reads the spec's ``layout`` and ``model_type`` only, so the support table can
ask it about every family row without loading weights. A new executor is one registration.

Access kinds, for the shipped executors:

========== ==============================================================================
kind       what the executor reads (and writes back when an intervention replaces it)
========== ==============================================================================
output     the module's output (a PyTorch forward hook; nnsight ``.output``)
input      the module's first input (a forward pre-hook; nnsight ``.input``)
cache_new  the key / value states passed to the cache's ``update`` (native)
cache_full the whole cache layer after ``update`` (native)
attention  inside notekv's attention function (native)
mask       the attention mask the attention module receives (native; Knockout)
router     the router's output, re-routed when replaced (native; ``moe.router``, ExpertKnockout)
experts    the experts module's call, split by expert (native; ``moe.experts``)
rope       the output of ``apply_rotary_pos_emb`` in the attention forward (nnsight ``.source``)
hook       a TransformerLens hook point; ``module`` is the hook name
========== ==============================================================================

Layouts (the view between a module value and notekv's shapes) are in
:mod:`notekv.hooks.layouts`.

What a site is on families that scale or cap around their modules: ``embed`` is the
embedding module's output, before any multiplier the model applies after it (Granite's
``embedding_multiplier``; ``L0.resid_pre`` is after it); ``attn_out``/``mlp_out`` are the
attention / MLP module's output (its post-norm where the family has one), before Granite's
``residual_multiplier`` (there ``resid_post = resid_pre + m * attn_out + m * mlp_out``);
``logits`` are the model's logits, after Gemma-2's soft-cap,
Cohere's ``logit_scale`` and Granite's ``logits_scaling`` (the output object's ``logits``,
``FamilyLayout.logits_out``). On OLMo-2 (no pre-norms) ``resid_mid`` is the MLP's input.

:func:`support_table` / :func:`format_support_table` generate what each executor supports
from the builders.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from ..errors import InputError, NotekvError
from ..model.arch import FAMILIES, ArchSpec, FamilyLayout, resolve_layout
from .layouts import from_site, to_site  # noqa: F401  (re-exported: executors import them from here)
from .sites import CACHE_SITES, GLOBAL_SITES, LAYER_SITES, MOE_SITES, Site, SiteError

#: Sites only the plan uses internally (not in the public grammar): Knockout's mask.
MASK_SITE = "attn.mask"


class UnsupportedError(NotekvError, NotImplementedError):
    """What an executor cannot do on this model (a site it cannot reach, an intervention
    or a model feature it cannot run); the message names the site, the executor and what
    to use instead."""


@dataclass(frozen=True)
class Access:
    """How one executor reaches a site: module path from the model root (a hook name for
    TransformerLens), kind, layout."""

    module: str
    kind: str
    layout: str = "plain"


@dataclass(frozen=True)
class Unsupported:
    """A site an executor cannot reach, with the reason (said in its error)."""

    why: str


RouteBuilder = Callable[[ArchSpec, str, "int | None"], "Access | Unsupported"]


@dataclass(frozen=True)
class ExecutorRoutes:
    """One registered executor: its route builder and how its refusals read.

    ``label``: the executor in messages (``"the TransformerLens backend"``); ``column``: its
    heading in the support table; ``fix``: what a refused user should do; ``refusal``: the
    error class a refused site raises (:class:`UnsupportedError`, or :class:`SiteError` for
    the native layer, which reaches every site a model has)."""

    name: str
    build: RouteBuilder
    label: str
    column: str
    fix: str = ""
    refusal: type[Exception] = UnsupportedError

    def refuse(self, site: Site, why: str) -> Exception:
        if self.refusal is SiteError:
            return SiteError(f"site {site}: {why}")
        return self.refusal(f"site {site}: {why}; not supported by {self.label}. {self.fix}".rstrip())


_REGISTRY: dict[str, ExecutorRoutes] = {}
_VERSION = [0]  # bumped on every registration: site maps rebuild their routes


def register_executor(name: str, build: RouteBuilder, *, label: str, column: str | None = None, fix: str = "",
                      refusal: type[Exception] = UnsupportedError) -> None:
    """Register (or replace) executor ``name``'s route builder; see :class:`ExecutorRoutes`.

    >>> register_executor("mine", lambda spec, name, layer: Unsupported("not yet"),
    ...                   label="my backend", fix="Use model.run for it.")
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"name={name!r}: an executor needs a non-empty string name")
    if not callable(build):
        raise InputError(f"build={build!r}: pass a function (spec, site name, layer) -> Access | Unsupported")
    _REGISTRY[name] = ExecutorRoutes(name, build, label, column or name, fix, refusal)
    _VERSION[0] += 1


def unregister_executor(name: str) -> None:
    """Remove executor ``name``'s routes (site maps rebuild theirs); a no-op if absent."""
    if _REGISTRY.pop(name, None) is not None:
        _VERSION[0] += 1


def _load_shipped() -> None:
    """Import the executors notekv ships, so that they have registered (idempotent)."""
    from .. import backends  # noqa: F401  (registers its executors on import)
    from . import layer  # noqa: F401  (the native hook layer)


def executors() -> tuple[str, ...]:
    """The registered executors, native first."""
    _load_shipped()
    names = list(_REGISTRY)
    return tuple(sorted(names, key=lambda n: n != "native"))


def executor(name: str) -> ExecutorRoutes:
    """The registration of executor ``name``; :class:`~notekv.errors.InputError` if none."""
    if name not in _REGISTRY:
        _load_shipped()
    if name not in _REGISTRY:
        raise InputError(f"executor={name!r}: not registered; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


@dataclass(frozen=True)
class Route:
    """Where whole site ``site`` lives for each executor: ``pairs`` of (executor, access or
    why not), read as the mapping :attr:`ways`."""

    site: Site
    pairs: tuple[tuple[str, Access | Unsupported], ...]

    @property
    def ways(self) -> Mapping[str, Access | Unsupported]:
        """Executor name -> :class:`Access` or :class:`Unsupported`."""
        return MappingProxyType(dict(self.pairs))

    def get(self, executor_name: str) -> Access | Unsupported:
        """The access of ``executor_name``, or why it has none (never raises for a known executor)."""
        for name, got in self.pairs:
            if name == executor_name:
                return got
        executor(executor_name)  # raises for an unknown name
        raise InputError(f"executor={executor_name!r}: registered after this route was built; rebuild the site map")

    def access(self, executor_name: str) -> Access:
        """The access of ``executor_name`` (``"native"``, ``"tl"``, ``"nnsight"`` or any
        registered one). A site the model lacks raises :class:`SiteError` natively; one a
        backend cannot reach raises :class:`UnsupportedError` (a ``NotImplementedError``);
        both name the site and the reason."""
        got = self.get(executor_name)
        if isinstance(got, Unsupported):
            raise executor(executor_name).refuse(self.site, got.why)
        return got


def projection(lay: FamilyLayout, which: int, layer_path: str) -> Access:
    """``attn.q_pre`` / ``attn.k_pre`` / ``attn.v`` (which = 0, 1, 2) at the projections
    (after the QK-norm where the family has one; a slice of a fused projection)."""
    attn = f"{layer_path}.{lay.attn}"
    if lay.qkv_proj is not None:
        split = "flat" if lay.qkv_split == "flat" else "fused"
        return Access(f"{attn}.{lay.qkv_proj}", "output", f"{split}{which}")
    heads = "heads_q" if which == 0 else "heads_kv"
    norm = (lay.q_norm, lay.k_norm, None)[which]
    if norm is not None:
        return Access(f"{attn}.{norm}", "output", "plain" if lay.qk_norm_output == "bhsd" else heads)
    return Access(f"{attn}.{(lay.q_proj, lay.k_proj, lay.v_proj)[which]}", "output", heads)


def module_access(spec: ArchSpec, name: str, layer: int | None) -> Access | None:
    """The access of a site that is a plain module input or output (residual stream, block
    outputs, pre-RoPE q/k/v, ``attn.z``, ``embed``, ``logits``), which every executor
    hooking PyTorch modules shares; None for the sites inside attention or the cache."""
    lay = spec.layout
    if name == "logits" and lay.logits_out is not None:
        return Access(lay.logits_out, "output", "logits")
    if name in GLOBAL_SITES:
        return Access(lay.embed if name == "embed" else lay.unembed, "output")
    L = f"{lay.layers}.{layer}"
    if name == "resid_pre":
        return Access(L, "input")
    if name == "resid_mid":
        return Access(f"{L}.{lay.resid_mid}", "input")
    if name == "resid_post":
        return Access(L, "output", "first")
    if name in ("attn_out", "mlp_out"):
        return Access(f"{L}.{lay.attn_out if name == 'attn_out' else lay.mlp_out}", "output", "first")
    if name == "attn.v" and lay.v_proj is None and lay.qkv_proj is None:
        return None  # latent attention: values are expanded inside the attention module (cache sites only)
    if name in ("attn.q_pre", "attn.k_pre", "attn.v"):
        return projection(lay, ("attn.q_pre", "attn.k_pre", "attn.v").index(name), L)
    if name == "attn.z":
        return Access(f"{L}.{lay.attn}.{lay.o_proj}", "input", "heads_q")
    return None


def _absent(spec: ArchSpec, name: str, layer: int | None = None) -> str | None:
    """Why the model has no such site at all (for every executor), or None."""
    if name == "resid_mid" and spec.layout.resid_mid is None:
        return f"{spec.model_type} uses a parallel residual; there is no resid_mid"
    attention = name == "attn_out" or name.startswith("attn.") or name in CACHE_SITES
    if attention and layer is not None and 0 <= layer < len(spec.layer_types) and not spec.attends(layer):
        return (f"layer {layer} of this {spec.model_type} model is a state-space (Mamba) layer "
                f"({spec.layer_types[layer]}): it has no attention, queries, keys, values or KV cache; its residual "
                f"sites and mlp_out exist (what its mixer adds is resid_mid - resid_pre), and the attention layers "
                f"are {list(spec.attention_layers)}")
    if name == "attn.k_pre" and spec.layout.kv_expand:
        return (f"{spec.model_type} uses latent attention: its keys are expanded from a latent shared by all heads "
                "(the un-rotated part) and one rotary key shared by all heads, inside the attention module, so no "
                "module outputs a per-head pre-RoPE key; use attn.k (post-RoPE, as cached) or kv.k")
    if name in MOE_SITES:  # a dense family, or a dense layer of a mixture-of-experts model
        from .moe import absent

        return absent(spec, layer)
    return None


def build_route(spec: ArchSpec, name: str, layer: int | None) -> Route:
    """The :class:`Route` of whole site ``name`` at ``layer`` from every registered builder."""
    _load_shipped()
    s = Site(name, layer)
    gone = _absent(spec, name, layer)
    return Route(s, tuple((ex, Unsupported(gone) if gone else reg.build(spec, name, layer))
                          for ex, reg in _REGISTRY.items()))


class SiteMap:
    """Every site's :class:`Route` for one model (built from its :class:`ArchSpec`)."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        self._routes: dict[tuple[str, int | None], Route] = {}
        self._version = _VERSION[0]

    def route(self, s: Site) -> Route:
        """The route of ``s`` (its head suffix is dropped); :class:`SiteError` if the layer
        or head is out of range."""
        s.check(self.spec.n_layers, self.spec.n_heads, self.spec.n_kv_heads)
        return self._route(s.name, s.layer)

    def _route(self, name: str, layer: int | None) -> Route:
        if self._version != _VERSION[0]:  # an executor registered since: rebuild
            self._routes.clear()
            self._version = _VERSION[0]
        key = (name, layer)
        if key not in self._routes:
            self._routes[key] = build_route(self.spec, name, layer)
        return self._routes[key]

    def tl_name(self, s: "Site | str") -> str:
        """The TransformerLens hook name of site ``s`` on this model (``hook_k_normed`` on
        QK-norm models); :class:`UnsupportedError` where TransformerLens has none."""
        from .sites import site as parse

        return self.route(parse(s)).access("tl").module

    def tl_hook(self, name: str) -> tuple[Site, Access]:
        """The notekv site of TransformerLens hook name ``name`` and TransformerLens's access
        to it (``access.layout``: how TransformerLens lays the tensor out, see
        :mod:`notekv.hooks.layouts`). :class:`SiteError` when ``name`` is not this model's
        TransformerLens hook of that site (``hook_q`` on a QK-norm model is the query before
        the norm, which notekv has no site for: its ``attn.q_pre`` is ``hook_q_normed``) or
        TransformerLens has no hook for it here; the message says notekv's layout."""
        from .sites import shape_of
        from .sites import site as parse

        given = name.strip()
        s = parse(given)
        got = self.route(s).get("tl")
        shape = shape_of(s.whole)
        if isinstance(got, Unsupported):
            raise SiteError(f"site {given!r}: TransformerLens has no hook for notekv's {s.whole} on this "
                            f"{self.spec.model_type} model ({got.why}), so its layout there is unknown; address it "
                            f"by its notekv name {str(s.whole)!r}, whose tensor is in notekv's layout {shape}")
        if got.module != given:
            raise SiteError(f"site {given!r}: on this {self.spec.model_type} model notekv's {s.whole} {shape} is "
                            f"TransformerLens's {got.module!r}, not {given!r} (the query/key before or after the "
                            f"QK-norm); use {got.module!r}, or the notekv name {str(s.whole)!r}")
        return s, got

    def to_notekv(self, s: "Site | str", value, executor_name: str) -> "torch.Tensor":
        """``value`` as executor ``executor_name`` reads whole site ``s`` (a TransformerLens
        hook's tensor for ``"tl"``: ``[B, S, H, D]`` for ``hook_z``; an nnsight module value
        for ``"nnsight"``: ``o_proj.input`` ``[B, S, H * D]`` for ``attn.z``) converted to
        notekv's layout (``[B, H, S, D]``): what a :class:`~notekv.Patch` source or a Run
        holds. Where each executor reads a site: ``model.sitemap.route(site).access(name)``.
        A tensor without the batch axis (TransformerLens's ``remove_batch_dim=True``) gets
        one batch row."""
        from .layouts import to_site
        from .sites import site as parse

        whole = parse(s).whole
        acc = self.route(whole).access(executor_name)
        if isinstance(value, torch.Tensor) and executor_name == "tl":
            unbatched = {"swap": 3, "plain": 3 if whole.head_split else 2}.get(acc.layout)
            if unbatched is not None and value.dim() == unbatched:
                value = value[None]
        return to_site(acc.layout, value, self.spec)

    def names(self, executor_name: str = "native") -> list[str]:
        """Every whole site string of this model that ``executor_name`` reaches, in layer order."""
        out = [GLOBAL_SITES[0]]
        for l in range(self.spec.n_layers):
            out += [f"L{l}.{name}" for name in LAYER_SITES
                    if not isinstance(self._route(name, l).get(executor_name), Unsupported)]
        return out + [GLOBAL_SITES[1]]

    def expand(self, collect) -> list[Site]:
        """Sites named by ``collect``: ``"all"`` (every native site but the cache slots
        ``kv.*``, which ``Run.kv`` already holds: TransformerLens's ``run_with_cache``), a
        site string, a glob over notekv names (``"L*.attn.pattern"``, ``"L1?.resid_post"``)
        or TransformerLens names (``"blocks.*.hook_resid_pre"``), or an iterable of these."""
        import fnmatch

        from .sites import site as parse

        if isinstance(collect, (str, Site)):
            collect = [collect]
        out: list[Site] = []
        for item in collect:
            if isinstance(item, Site) or not any(c in item for c in "*?[") and item != "all":
                out.append(parse(item))
                continue
            names = self.names("native")
            if item == "all":
                hits = [n for n in names if ".kv." not in n]
            elif item.startswith(("blocks.", "hook_", "unembed.")):
                tl = {a.module: n for n in names if isinstance((a := self.route(parse(n)).get("tl")), Access)}
                hits = [tl[k] for k in fnmatch.filter(list(tl), item)]
            else:
                hits = fnmatch.filter(names, item)
            if not hits:
                raise SiteError(f"collect pattern {item!r} matches no site of this model; e.g. 'L*.resid_pre', "
                                "'L3.attn.*', 'blocks.*.hook_resid_post' or 'all'")
            out += [parse(n) for n in hits]
        return list(dict.fromkeys(out))


# ---------------------------------------------------------------------- the families, without weights
@functools.lru_cache(maxsize=None)
def _default_config(model_type: str):
    """The default transformers config of ``model_type`` (what a row's switches default to)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def family_specs() -> list[ArchSpec]:
    """One weightless :class:`ArchSpec` per row of the family table (as its config defaults
    build it: GPT-NeoX with its parallel residual), for questions about the map alone."""
    out = []
    for model_type, lay in FAMILIES.items():
        if lay.parallel_residual_flag or lay.qk_norm_flag:  # switched by the config: its defaults
            lay = resolve_layout(lay, _default_config(model_type))
        out.append(ArchSpec(model_type=model_type, layout=lay, n_layers=1, d_model=1, n_heads=1, n_kv_heads=1,
                            head_dim=1, vocab_size=1, max_positions=0, layer_types=("full_attention",),
                            sliding_window=None, rope=()))
    return out


def common_tl_name(s: Site) -> str:
    """The TransformerLens hook name of ``s`` when it is the same on every family that has
    one; :class:`SiteError` when it depends on the model (``attn.q_pre``/``attn.k_pre`` are
    ``hook_q_normed``/``hook_k_normed`` on QK-norm models: ask ``model.sitemap.tl_name``) or
    TransformerLens has none."""
    whole = s.whole
    names: dict[str, list[str]] = {}
    why = ""
    for spec in family_specs():
        got = build_route(spec, whole.name, whole.layer).get("tl")
        if isinstance(got, Access):
            names.setdefault(got.module, []).append(spec.model_type)
        else:
            why = got.why
    if len(names) == 1:
        return next(iter(names))
    if not names:
        raise SiteError(f"site {s}: TransformerLens has no hook for it ({why})")
    options = "; ".join(f"{n} on {', '.join(f)}" for n, f in names.items())
    raise SiteError(f"site {s}: its TransformerLens name depends on the model ({options}); "
                    "use model.sitemap.tl_name(site)")


# ---------------------------------------------------------------------- the support table
OK = "✓"
_TABLE_SITES = (GLOBAL_SITES[0],) + LAYER_SITES + (GLOBAL_SITES[1], MASK_SITE)
_USED_BY = {MASK_SITE: "Knockout", **{c: "KVPatch" for c in CACHE_SITES}}


def _cell(results: list[tuple[str, Access | Unsupported]]) -> str:
    """One table cell from (family, access) pairs: ✓, the reason, or ✓ with exceptions."""
    bad: dict[str, list[str]] = {}
    for fam, got in results:
        if isinstance(got, Unsupported):
            bad.setdefault(re.sub(rf"(?<!\w){re.escape(fam)}(?!\w)", "{family}", got.why), []).append(fam)
    if not bad:
        return OK
    # A reason that names its family reads as it is for one family, with "the family" for several.
    bad = {why.replace("{family}", fams[0] if len(fams) == 1 else "the family"): fams for why, fams in bad.items()}
    if sum(len(f) for f in bad.values()) == len(results) and len(bad) == 1:
        return next(iter(bad))
    parts = [why if all(f in why for f in fams) else f"{', '.join(fams)}: {why}" for why, fams in bad.items()]
    return f"{OK} except " + "; ".join(parts)


def _table_layer(spec: ArchSpec, name: str) -> int | None:
    """The layer at which the support table reads site ``name`` of ``spec``: the first one
    where notekv's hook layer reaches it (layer 0 when none does); None for a global site."""
    if name in GLOBAL_SITES:
        return None
    return next((l for l in range(spec.n_layers)
                 if not isinstance(build_route(spec, name, l).get("native"), Unsupported)), 0)


def support_table(spec: ArchSpec | None = None) -> list[dict[str, str]]:
    """What each executor supports, generated from the registered route builders: one row
    per site kind (``{"site": name, executor: "✓" | reason, ...}``), executors native first.

    ``spec``: one model's :class:`ArchSpec`; None: every family of the table (a cell then
    says ``✓ except <families>: <reason>`` where families differ). A layer site is read at
    the first layer that has it (a hybrid's attention sites at its first attention layer)."""
    specs = [spec] if spec is not None else family_specs()
    names = executors()
    rows = []
    for name in _TABLE_SITES:
        routes = [(sp.model_type, build_route(sp, name, _table_layer(sp, name))) for sp in specs]
        row = {"site": name}
        for ex in names:
            row[ex] = _cell([(fam, r.get(ex)) for fam, r in routes])
        rows.append(row)
    return rows


def format_support_table(spec: ArchSpec | None = None) -> str:
    """:func:`support_table` as Markdown: sites x executors, then what follows from it."""
    names = executors()
    heads = [_REGISTRY[n].column for n in names]
    lines = ["| site | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for row in support_table(spec):
        label = f"`{row['site']}`" + (f" ({_USED_BY[row['site']]})" if row["site"] in _USED_BY else "")
        lines.append(f"| {label} | " + " | ".join(row[n].replace("|", "\\|") for n in names) + " |")
    lines += [
        "",
        "Head suffixes (`.h{n}`) work wherever the whole site does. Collect, Patch, Ablate, Steer, Hook, "
        "Tap and GradGate run wherever their site does; Knockout needs `attn.mask`, KVPatch `kv.k`/`kv.v`. "
        "A refused site raises `UnsupportedError` (a `NotImplementedError`) naming the site and the executor; "
        "natively, a site the model lacks raises `SiteError`. The TransformerLens backend also refuses a hook "
        "that the bridge of a given model does not fire (checked when the backend is built).",
    ]
    return "\n".join(lines)
