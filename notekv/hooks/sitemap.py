"""The site map: for one model, where every site lives and how each executor reaches it.

This is the only place a site is resolved to a module. One :class:`Route` per whole site
(no head suffix) says, for each executor, which module value holds the activation and how
to see it in notekv's layout (:class:`Access`):

======== ==============================================================================
kind     what the executor reads (and writes back when an intervention replaces it)
======== ==============================================================================
output   the module's output (a PyTorch forward hook; nnsight ``.output``)
input    the module's first input (a forward pre-hook; nnsight ``.input``)
cache_new the key / value states passed to the cache's ``update`` (native only)
cache_full the whole cache layer after ``update`` (native only)
attention inside notekv's attention function (native only)
mask     the attention mask the attention module receives (native only; Knockout)
rope     the output of ``apply_rotary_pos_emb`` in the attention forward (nnsight ``.source``)
======== ==============================================================================

``layout`` names the view between the module value and notekv's shapes (``[B, S, d]``
residual, ``[B, H, S, D]`` head-split): ``plain`` (identity), ``first`` (first element of a
tuple output), ``heads_q`` / ``heads_kv`` (a ``[B, S, H*D]`` or ``[B, S, H, D]`` value split
into heads), ``fused0|1|2`` (q / k / v of GPT-NeoX's per-head fused projection), ``swap``
(``[B, S, H, D]`` <-> ``[B, H, S, D]``, what TransformerLens's hooks use), ``rope_q|rope_k``
(element 0 / 1 of the RoPE call's output). :func:`to_site` and :func:`from_site` apply a
layout in both directions; every executor uses them.

The rows are built from the family table (:class:`~notekv.model.arch.FamilyLayout`), so a
new family is a new table row there and a new site one entry in :data:`_ROWS` here.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..model.arch import ArchSpec
from .sites import GLOBAL_SITES, LAYER_SITES, TL_NAME_OF, Site, SiteError

#: Sites only the plan uses internally (not in the public grammar).
MASK_SITE = "attn.mask"


@dataclass(frozen=True)
class Access:
    """How one executor reaches a site: module path from the model root, kind, layout."""

    module: str
    kind: str
    layout: str = "plain"


@dataclass(frozen=True)
class Unsupported:
    """A site an executor cannot reach, with the reason (said in its error)."""

    why: str


@dataclass(frozen=True)
class Route:
    """Where whole site ``site`` lives for each executor; ``tl`` is the TransformerLens hook name."""

    site: Site
    native: Access | Unsupported
    nnsight: Access | Unsupported
    tl: str | Unsupported

    def access(self, executor: str) -> Access | str:
        """The access of ``executor`` (``"native"``, ``"nnsight"`` or ``"tl"``). A site the model
        lacks raises :class:`SiteError` natively; one a backend cannot reach raises
        ``NotImplementedError``; both name the site and the reason."""
        got = getattr(self, executor)
        if isinstance(got, Unsupported) and executor == "native":
            raise SiteError(f"site {self.site}: {got.why}")
        if isinstance(got, Unsupported):
            names = {"nnsight": "the nnsight backend", "tl": "the TransformerLens backend"}
            raise NotImplementedError(f"site {self.site}: {got.why}; not supported by {names[executor]}. "
                                      "Use model.run for it.")
        return got


def _projection(lay, which: int, layer_path: str) -> Access:
    """``attn.q_pre`` / ``attn.k_pre`` / ``attn.v`` (which = 0, 1, 2) at the projections."""
    attn = f"{layer_path}.{lay.attn}"
    if lay.qkv_proj is not None:
        return Access(f"{attn}.{lay.qkv_proj}", "output", f"fused{which}")
    heads = "heads_q" if which == 0 else "heads_kv"
    norm = (lay.q_norm, lay.k_norm, None)[which]
    if norm is not None:
        return Access(f"{attn}.{norm}", "output", "plain" if lay.qk_norm_output == "bhsd" else heads)
    return Access(f"{attn}.{(lay.q_proj, lay.k_proj, lay.v_proj)[which]}", "output", heads)


_IN_KERNEL = Unsupported("it lives inside the attention kernel")
_CACHE_ONLY = Unsupported("it is a cache slot after the update, seen only by the native cache wrapper")


def _route(spec: ArchSpec, name: str, layer: int | None) -> Route:
    lay = spec.layout
    s = Site(name, layer)
    tl: str | Unsupported
    if name in GLOBAL_SITES:
        acc = Access(lay.embed if name == "embed" else lay.unembed, "output")
        return Route(s, acc, acc, {"embed": "hook_embed", "logits": "unembed.hook_out"}[name])
    L = f"{lay.layers}.{layer}"
    tl_rel = TL_NAME_OF.get(name)
    if name in ("attn.q_pre", "attn.k_pre") and (lay.q_norm if name == "attn.q_pre" else lay.k_norm):
        tl_rel = tl_rel + "_normed"  # the bridge's hook_q/hook_k sit before the QK-norm
    tl = f"blocks.{layer}.{tl_rel}" if tl_rel else _CACHE_ONLY
    if name == "resid_pre":
        native = nns = Access(L, "input")
    elif name == "resid_mid":
        if lay.resid_mid is None:
            native = nns = Unsupported(f"{spec.model_type} uses a parallel residual; there is no resid_mid")
            tl = native
        else:
            native = nns = Access(f"{L}.{lay.resid_mid}", "input")
    elif name == "resid_post":
        native = nns = Access(L, "output", "first")
    elif name in ("attn_out", "mlp_out"):
        native = nns = Access(f"{L}.{lay.attn_out if name == 'attn_out' else lay.mlp_out}", "output", "first")
    elif name in ("attn.q_pre", "attn.k_pre"):
        native = nns = _projection(lay, 0 if name == "attn.q_pre" else 1, L)
    elif name == "attn.v":
        native, nns = Access(f"{L}.{lay.attn}", "cache_new"), _projection(lay, 2, L)
    elif name == "attn.k":
        native, nns = Access(f"{L}.{lay.attn}", "cache_new"), Access(f"{L}.{lay.attn}", "rope", "rope_k")
    elif name == "attn.q":
        native, nns = Access(f"{L}.{lay.attn}", "attention"), Access(f"{L}.{lay.attn}", "rope", "rope_q")
    elif name == "attn.z":
        native = nns = Access(f"{L}.{lay.attn}.{lay.o_proj}", "input", "heads_q")
    elif name in ("attn.scores", "attn.pattern"):
        native, nns = Access(f"{L}.{lay.attn}", "attention"), _IN_KERNEL
    elif name in ("kv.k", "kv.v"):
        native, nns = Access(f"{L}.{lay.attn}", "cache_full"), _CACHE_ONLY
    elif name == MASK_SITE:
        native = Access(f"{L}.{lay.attn}", "mask")
        nns = tl = Unsupported("a knockout edits the attention mask notekv's native layer passes to the kernel")
    else:  # pragma: no cover - guarded by the site grammar
        raise SiteError(f"site {s}: no route")
    return Route(s, native, nns, tl)


class SiteMap:
    """Every site's :class:`Route` for one model (built from its :class:`ArchSpec`)."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        self._routes: dict[tuple[str, int | None], Route] = {}

    def route(self, s: Site) -> Route:
        """The route of ``s`` (its head suffix is dropped); :class:`SiteError` if the layer
        or head is out of range."""
        s.check(self.spec.n_layers, self.spec.n_heads, self.spec.n_kv_heads)
        return self._route(s.name, s.layer)

    def _route(self, name: str, layer: int | None) -> Route:
        key = (name, layer)
        if key not in self._routes:
            self._routes[key] = _route(self.spec, name, layer)
        return self._routes[key]

    def names(self, executor: str = "native") -> list[str]:
        """Every whole site string of this model that ``executor`` reaches, in layer order."""
        out = [GLOBAL_SITES[0]]
        for l in range(self.spec.n_layers):
            out += [f"L{l}.{name}" for name in LAYER_SITES
                    if not isinstance(getattr(self._route(name, l), executor), Unsupported)]
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
                tl = {str(r.tl): n for n in names if isinstance((r := self.route(parse(n))).tl, str)}
                hits = [tl[k] for k in fnmatch.filter(list(tl), item)]
            else:
                hits = fnmatch.filter(names, item)
            if not hits:
                raise SiteError(f"collect pattern {item!r} matches no site of this model; e.g. 'L*.resid_pre', "
                                "'L3.attn.*', 'blocks.*.hook_resid_post' or 'all'")
            out += [parse(n) for n in hits]
        return list(dict.fromkeys(out))


# ---------------------------------------------------------------------- layouts
def to_site(layout: str, raw, spec: ArchSpec, heads: int | None = None) -> torch.Tensor:
    """The notekv-layout tensor of module value ``raw`` (a view sharing storage where possible)."""
    if layout == "plain":
        return raw
    if layout == "first":
        return raw[0] if isinstance(raw, tuple) else raw
    if layout == "swap":
        return raw.transpose(1, 2)
    if layout in ("heads_q", "heads_kv"):
        b, s = raw.shape[:2]
        h = spec.n_heads if layout == "heads_q" else spec.n_kv_heads
        return raw.view(b, s, h, spec.head_dim).transpose(1, 2)
    if layout.startswith("fused"):
        i, d = int(layout[-1]), spec.head_dim
        b, s = raw.shape[:2]
        return raw.view(b, s, spec.n_heads, 3 * d)[..., i * d : (i + 1) * d].transpose(1, 2)
    if layout in ("rope_q", "rope_k"):
        return raw[0 if layout == "rope_q" else 1]
    raise ValueError(f"unknown layout {layout!r}")


def from_site(layout: str, raw, new: torch.Tensor, spec: ArchSpec):
    """``raw`` with its notekv-layout view replaced by ``new`` (the inverse of :func:`to_site`)."""
    if layout == "plain":
        return new
    if layout == "first":
        return (new,) + tuple(raw[1:]) if isinstance(raw, tuple) else new
    if layout == "swap":
        return new.transpose(1, 2).contiguous()
    if layout in ("heads_q", "heads_kv"):
        return new.transpose(1, 2).reshape(raw.shape)
    if layout.startswith("fused"):
        i, d = int(layout[-1]), spec.head_dim
        b, s = raw.shape[:2]
        out = raw.clone().view(b, s, spec.n_heads, 3 * d)
        out[..., i * d : (i + 1) * d] = new.transpose(1, 2)
        return out.reshape(raw.shape)
    if layout in ("rope_q", "rope_k"):
        i = 0 if layout == "rope_q" else 1
        return tuple(new if j == i else x for j, x in enumerate(raw))
    raise ValueError(f"unknown layout {layout!r}")
