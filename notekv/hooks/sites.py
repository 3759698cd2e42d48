"""Named sites: string addresses of activations, in notekv's grammar or TransformerLens's.

Grammar (``l`` a layer index, ``n`` a head index)::

    embed                                   [B, S, d_model]
    L{l}.resid_pre | resid_mid | resid_post [B, S, d_model]
    L{l}.attn_out | mlp_out                 [B, S, d_model]   what the block adds to the residual
    L{l}.attn.q | q_pre                     [B, H_q, S, D]    q post-RoPE | pre-RoPE (post QK-norm)
    L{l}.attn.k | k_pre | v                 [B, H_kv, S, D]   k post-RoPE (= cached) | pre-RoPE
    L{l}.attn.z                             [B, H_q, S, D]    per-head attention output (o_proj input)
    L{l}.attn.scores | pattern              [B, H_q, S_q, S_k] pre-softmax (masked) | post-softmax
    L{l}.kv.k | kv.v                        [B, H_kv, S_cache, D] the whole cache slot after the update
    L{l}.moe.router                         [B, S, n_experts]  router logits before softmax/top-k
    L{l}.moe.experts                        [B, S, n_experts, d_model] each expert's weighted output
    logits                                  [B, S, vocab]

``attn.q_pre``/``attn.k_pre`` are after QK-norm where a model has one (TransformerLens's
``hook_q_normed``/``hook_k_normed`` there; ``hook_q``/``hook_k`` on models without QK-norm):
which TransformerLens hook a site is on a given model is the site map's to say
(``model.sitemap.tl_name(site)``); the grammar here only parses those names.

A ``.h{n}`` suffix on a head-split site selects one head and drops the head axis. Heads on
``attn.k``, ``attn.k_pre``, ``attn.v`` and ``kv.*`` are KV heads; on ``q``, ``z``, ``scores``
and ``pattern`` they are query heads (``ArchSpec.kv_head_of`` maps one to the other).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
QUERY_HEAD_SITES = ("attn.q", "attn.q_pre", "attn.z")
KV_HEAD_SITES = ("attn.k", "attn.k_pre", "attn.v")
ATTN_MAP_SITES = ("attn.scores", "attn.pattern")
CACHE_SITES = ("kv.k", "kv.v")
#: Mixture-of-experts layers only (notekv.hooks.moe): replacing the router logits re-routes;
#: ``moe.experts`` summed over experts (plus any shared expert) is ``mlp_out``.
MOE_SITES = ("moe.router", "moe.experts")
LAYER_SITES = RESIDUAL_SITES + QUERY_HEAD_SITES + KV_HEAD_SITES + ATTN_MAP_SITES + CACHE_SITES + MOE_SITES
GLOBAL_SITES = ("embed", "logits")

_TL_BLOCK = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out",
    "attn.hook_q": "attn.q_pre", "attn.hook_rot_q": "attn.q", "attn.hook_k": "attn.k_pre",
    "attn.hook_rot_k": "attn.k", "attn.hook_v": "attn.v", "attn.hook_z": "attn.z",
    "attn.hook_attn_scores": "attn.scores", "attn.hook_pattern": "attn.pattern",
    "attn.hook_q_normed": "attn.q_pre", "attn.hook_k_normed": "attn.k_pre",
}
_TL_GLOBAL = {"hook_embed": "embed", "unembed.hook_out": "logits"}
#: TransformerLens hook name of each site (relative to ``blocks.{l}`` for layer sites) on a
#: model without QK-norm; the TransformerLens route builder adds ``_normed`` where needed.
TL_NAME_OF = {**{v: k for k, v in _TL_BLOCK.items() if not k.endswith("_normed")},
              **{v: k for k, v in _TL_GLOBAL.items()}}

_NATIVE = re.compile(r"^L(?P<layer>\d+)\.(?P<name>[a-z_]+(?:\.[a-z_]+)?)(?:\.h(?P<head>\d+))?$")
_TL = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<name>[a-z_.]+)$")


class SiteError(InputError):
    """A site string that does not parse or does not fit the model."""


@dataclass(frozen=True)
class Site:
    """One addressable activation. Build with :func:`site` from a string."""

    name: str
    layer: int | None = None
    head: int | None = None

    def __str__(self) -> str:
        if self.layer is None:
            return self.name
        return f"L{self.layer}.{self.name}" + (f".h{self.head}" if self.head is not None else "")

    @property
    def whole(self) -> "Site":
        """The same site with all heads (the tensor hooks actually see)."""
        return Site(self.name, self.layer, None)

    @property
    def head_split(self) -> bool:
        return self.name in QUERY_HEAD_SITES + KV_HEAD_SITES + ATTN_MAP_SITES + CACHE_SITES

    @property
    def head_kind(self) -> str | None:
        """``"q"`` for query heads, ``"kv"`` for KV heads, None for d_model sites."""
        if self.name in KV_HEAD_SITES + CACHE_SITES:
            return "kv"
        if self.name in QUERY_HEAD_SITES + ATTN_MAP_SITES:
            return "q"
        return None

    @property
    def pos_dim(self) -> int:
        """Axis of token positions in the full tensor (query positions for attention maps)."""
        return 2 if self.head_split else 1

    @property
    def tl_name(self) -> str:
        """The TransformerLens hook name of this site, read from the site map: the name every
        family agrees on. :class:`SiteError` where it depends on the model (``attn.q_pre`` /
        ``attn.k_pre``: ``hook_k`` vs ``hook_k_normed``; use ``model.sitemap.tl_name(site)``)
        or where TransformerLens has no hook (``kv.*``)."""
        from .sitemap import common_tl_name

        return common_tl_name(self)

    def check(self, n_layers: int, n_heads: int, n_kv_heads: int) -> "Site":
        """Raise :class:`SiteError` if the layer or head does not exist in the model."""
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise SiteError(f"site {self}: layer {self.layer} out of range, the model has {n_layers} layers")
        if self.head is not None:
            limit = n_kv_heads if self.head_kind == "kv" else n_heads
            kind = "KV heads" if self.head_kind == "kv" else "query heads"
            if not 0 <= self.head < limit:
                raise SiteError(f"site {self}: head {self.head} out of range, the model has {limit} {kind}")
        return self


def is_tl_name(spec: "str | Site") -> bool:
    """Whether ``spec`` is a TransformerLens hook name (``"blocks.3.attn.hook_z"``,
    ``"hook_embed"``) rather than a notekv site string."""
    if not isinstance(spec, str):
        return False
    s = spec.strip()
    m = _TL.match(s)
    return s in _TL_GLOBAL or bool(m and m["name"] in _TL_BLOCK)


def shape_of(s: Site) -> str:
    """notekv's layout of whole site ``s`` in words: ``"[B, S, d_model]"``,
    ``"[B, H_q, S, D]"``, ``"[B, H_kv, S, D]"`` or ``"[B, H_q, S_q, S_k]"``."""
    if s.name in ATTN_MAP_SITES:
        return "[B, H_q, S_q, S_k]"
    if s.name in CACHE_SITES:
        return "[B, H_kv, S_cache, D]"
    if s.name in MOE_SITES:
        return "[B, S, n_experts]" if s.name == "moe.router" else "[B, S, n_experts, d_model]"
    if s.head_kind is not None:
        return f"[B, H_{s.head_kind}, S, D]"
    return "[B, S, vocab]" if s.name == "logits" else "[B, S, d_model]"


def site(spec: "str | Site") -> Site:
    """Parse a site string (notekv grammar or a TransformerLens hook name)."""
    if isinstance(spec, Site):
        return spec
    s = spec.strip()
    if s in GLOBAL_SITES:
        return Site(s)
    if s in _TL_GLOBAL:
        return Site(_TL_GLOBAL[s])
    m = _TL.match(s)
    if m and m["name"] in _TL_BLOCK:
        return Site(_TL_BLOCK[m["name"]], int(m["layer"]))
    m = _NATIVE.match(s)
    if m and m["name"] in LAYER_SITES:
        head = int(m["head"]) if m["head"] is not None else None
        out = Site(m["name"], int(m["layer"]), head)
        if head is not None and not out.head_split:
            raise SiteError(f"site {s!r}: {m['name']} has no head axis; drop the .h{head} suffix")
        return out
    raise SiteError(
        f"unknown site {spec!r}. Use 'embed', 'logits', 'L<layer>.<name>[.h<head>]' with name in "
        f"{', '.join(LAYER_SITES)}, or a TransformerLens hook name such as 'blocks.3.hook_resid_pre'"
    )


def layer_sites(name: str, n_layers: int) -> list[Site]:
    """``name`` at every layer: ``layer_sites("resid_pre", 30)``."""
    return [site(f"L{l}.{name}") for l in range(n_layers)]
