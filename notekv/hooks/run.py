"""``Run``: the result of one hooked forward, and cache helpers the hook layer needs."""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float

from ..errors import InputError, NotFoundError
from .positions import TokenView
from .sites import is_tl_name
from .sites import site as parse_site


class CacheError(InputError):
    """A cache that cannot be used where it was passed."""


class CacheTypeError(CacheError, TypeError):
    """An object passed where a cache (KVCache, Run or transformers cache) was expected."""


class Run:
    """The result of one forward: logits ``[B, S, vocab]``, collected activations keyed by
    site string, the KV cache after the forward as a :class:`~notekv.KVCache` (``kv``; built
    on first access from the transformers cache ``hf_cache``, which every layer fills fully),
    the token ids ``[B, S]`` of this forward, the prompt's :class:`TokenView` (batch row 0's;
    ``view.rows`` holds every row's for a batch of different texts) and the fingerprint of
    the model that computed it. Activations cover slots ``start ..
    start + S - 1`` (``start`` = the past's length), and a Patch from this Run reads them by
    absolute slot.

    ``run[name]`` reads a collected activation: by notekv name (``run["L3.attn.z"]``,
    notekv's layout ``[B, H, S, D]``) or by TransformerLens hook name
    (``run["blocks.3.attn.hook_z"]``, TransformerLens's layout ``[B, S, H, D]``, a view), as
    a TransformerLens ``ActivationCache`` would give it; ``run.acts`` holds notekv's."""

    def __init__(self, logits: torch.Tensor | None, acts: dict[str, torch.Tensor] | None = None, kv=None,
                 ids: torch.Tensor | None = None, view: TokenView | None = None, *, hf_cache=None,
                 fingerprint: dict | None = None, kv_factory: Callable[[], object] | None = None):
        self.logits = logits
        self.acts = {} if acts is None else acts
        self.ids = ids
        self.view = view
        self.hf_cache = hf_cache
        self.fingerprint = fingerprint if fingerprint is not None else getattr(kv, "fingerprint", None)
        self._kv = kv
        self._kv_factory = kv_factory
        self.slot_meta: tuple | None = None  # (positions, token ids, segments) of every cached slot
        self.start = 0  # absolute slot of this forward's first token (the past's length)
        self.taps: dict[str, torch.Tensor] = {}  # site -> its differentiable handle (grad=True forwards)
        #: The computing model's site map (set by ``model.run`` and the backends): how
        #: TransformerLens lays out each site, for ``run["blocks.3.attn.hook_z"]``.
        self.sitemap = None

    def __repr__(self) -> str:
        shape = tuple(self.logits.shape) if self.logits is not None else None
        return f"Run(logits={shape}, acts={sorted(self.acts)}, kv={'yes' if self.has_kv else 'no'})"

    @property
    def has_kv(self) -> bool:
        return self._kv is not None or self.hf_cache is not None

    @property
    def kv(self):
        """The cache after this forward as a :class:`~notekv.KVCache` (None if none was kept)."""
        if self._kv is None and self._kv_factory is not None:
            self._kv = self._kv_factory()
        return self._kv

    def layer_kv(self, layer: int) -> tuple[Float[torch.Tensor, "batch kv_heads slots head_dim"],
                                            Float[torch.Tensor, "batch kv_heads slots v_dim"]]:
        """Keys and values ``[B, H_kv, S, D]`` of ``layer`` (views, no copy)."""
        if self.hf_cache is not None:
            lay = self.hf_cache.layers[layer]
            return lay.keys, lay.values
        if self._kv is None:
            raise CacheError("this Run kept no cache")
        return self._kv.keys[layer], self._kv.values[layer]

    def grads(self, score: torch.Tensor, sites=None, *, retain: bool = False) -> dict[str, torch.Tensor]:
        """``d score / d activation`` at the tapped sites (all, or ``sites``), each in its
        site's layout and shape. ``score``: a scalar computed from this Run's logits (sum the
        rows of a batch: rows do not interact, so each row gets its own gradient).
        ``retain=True`` keeps the graph for another call; otherwise it is freed and the
        logits are detached. A score that does not depend on this Run's taps (computed from
        another Run's logits) is a :class:`GradError`, not a map of zeros."""
        from .grad import GradError

        if not self.taps:
            raise GradError("this Run has no gradient taps: run with interventions=[nk.Tap(site), ...] and grad=True "
                            "(or the graph was used up by an earlier grads() without retain=True)")
        if not isinstance(score, torch.Tensor) or score.dim() != 0:
            shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise GradError(f"score: a scalar tensor computed from this Run's logits, got {shape}; sum a batch's rows")
        if not score.requires_grad:
            raise GradError("score does not depend on any tapped site: compute it from this Run's logits")
        keys = list(self.taps) if sites is None else [str(parse_site(s)) for s in sites]
        missing = [k for k in keys if k not in self.taps]
        if missing:
            raise GradError(f"{missing[0]} was not tapped; tapped: {sorted(self.taps)}")
        handles = [self.taps[k] for k in keys]
        if not _depends_on(score, self.taps.values()):
            raise GradError("score does not depend on this Run's tapped sites: it was computed from another Run's "
                            "logits (or from nothing this forward tapped), so every gradient would be zero; compute "
                            "it from this Run's logits (run.logits) or activations downstream of its taps")
        got = torch.autograd.grad(score, handles, retain_graph=retain, allow_unused=True)
        out = {k: (torch.zeros_like(h) if g is None else g) for k, h, g in zip(keys, handles, got)}
        if not retain:
            self.taps = {}
            if self.logits is not None:
                self.logits = self.logits.detach()
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        s = parse_site(name)
        key = str(s)
        if key not in self.acts:
            raise NotFoundError(f"{key} was not collected; collected: {sorted(self.acts)}")
        if not is_tl_name(name):
            return self.acts[key]
        from .layouts import module_view
        from .sites import SiteError, shape_of

        if self.sitemap is None:
            if s.head_split and s.name not in ("attn.scores", "attn.pattern"):
                raise SiteError(f"run[{name!r}]: this Run does not know its model's TransformerLens layouts (it was "
                                f"not made by model.run or a backend); read run[{key!r}], in notekv's layout "
                                f"{shape_of(s)}")
            return self.acts[key]
        _, acc = self.sitemap.tl_hook(name)
        return module_view(acc.layout, self.acts[key])

    def __contains__(self, name) -> bool:
        try:
            return str(parse_site(name)) in self.acts
        except InputError:
            return False

    @property
    def tokens(self) -> list[str]:
        return list(self.view.tokens) if self.view is not None else []

    def logit_diff(self, a: int, b: int, pos: int = -1) -> torch.Tensor:
        """``logit[a] - logit[b]`` at ``pos`` for each batch row, shape ``[B]``."""
        return self.logits[:, pos, a] - self.logits[:, pos, b]


def _depends_on(score: torch.Tensor, leaves) -> bool:
    """Whether the autograd graph of ``score`` reaches any of ``leaves`` (tensors that require
    grad), walked without running a backward pass (so another Run's graph is left intact)."""
    targets = {id(t) for t in leaves}
    if id(score) in targets:
        return True
    seen, stack = set(), [score.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if var is not None and id(var) in targets:
            return True
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False


def check_hf_cache(cache, model, what: str) -> None:
    """Refuse a transformers cache that ``model`` did not compute: one notekv made carries the
    model's fingerprint; any other must at least have the model's layer count and K/V shapes."""
    from ..kv import CacheMismatchError

    fp = getattr(cache, "_notekv_fingerprint", None)
    if fp is not None and dict(fp) != dict(model.fingerprint):
        raise CacheMismatchError(f"{what}: this cache was computed by another model ({fp}); {model.name} is "
                                 f"{model.fingerprint}. Recompute it with this model.")
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CacheError(f"{what}: expected a KVCache, a Run or a transformers cache, got {type(cache).__name__}")
    spec = model.spec
    filled = [l for l in layers if getattr(l, "is_initialized", False) and getattr(l, "keys", None) is not None]
    if filled and len(layers) != spec.n_layers:
        raise CacheMismatchError(f"{what}: the cache has {len(layers)} layers, {model.name} has {spec.n_layers}")
    from .latent import is_latent

    for l in filled[:1]:
        if is_latent(l.keys, l.values, spec):  # latent attention: from_hf expands it
            continue
        if l.keys.dim() != 4 or l.keys.shape[1] != spec.n_kv_heads or l.keys.shape[3] != spec.head_dim:
            raise CacheMismatchError(f"{what}: cache keys of shape {tuple(l.keys.shape)} do not fit {model.name} "
                                     f"([B, {spec.n_kv_heads}, S, {spec.head_dim}])")


def as_kvcache(source, model, what: str = "past"):
    """The one conversion of a cache-like input into a :class:`~notekv.KVCache` of ``model``.

    ``source``: a KVCache (checked against the model), a :class:`Run` (its cache; the Run must
    come from this model and have kept one) or a transformers cache (checked for the model's
    fingerprint, layer count and K/V shapes; its slots get token id -1 and RoPE positions
    ``0..S-1`` since a transformers cache does not record them). An empty transformers cache
    gives None. ``what`` names the argument in errors. Every public entry that accepts a
    cache calls this once; inside the library only KVCache circulates.
    """
    from transformers.cache_utils import Cache

    from ..kv import KVCache

    if isinstance(source, KVCache):
        source.check_model(model)
        return source
    if isinstance(source, Run):
        from .interventions import check_source_model

        check_source_model(source, model, what)
        if not source.has_kv:
            raise CacheError(f"{what}: this Run kept no cache (it came from a backend without one); use model.run")
        kv = source.kv
        kv.check_model(model)  # a Run read from a file carries its cache's own checks
        return kv
    if isinstance(source, Cache):
        check_hf_cache(source, model, what)
        if not source.layers or not getattr(source.layers[0], "is_initialized", False) or source.get_seq_length() == 0:
            return None
        lengths = {l.keys.shape[2] for l in source.layers}
        if len(lengths) > 1:
            raise CacheError(
                f"{what}: cache layers hold different numbers of tokens {sorted(lengths)}: a sliding-window "
                "cache has dropped tokens. Prefill through notekv (model.run) to keep every layer full."
            )
        n = lengths.pop()
        return KVCache.from_hf(source, model, torch.full((n,), -1, dtype=torch.int64))
    raise CacheTypeError(f"{what}: expected a KVCache, a Run or a transformers cache, got {type(source).__name__}")


def copy_cache(cache, room: int = 0):
    """A new ``DynamicCache`` over ``cache``'s tensors (a KVCache, a Run or a transformers
    cache; None gives an empty one). With ``room == 0`` its layers are views (appending
    concatenates into new tensors, ``cache`` never changes); ``room > 0`` gives preallocated
    layers with that many free slots. Sliding-window layers that dropped tokens are refused.

    Deprecated: ``nk.as_kvcache(cache, model).to_hf(room)`` converts and checks the cache
    against its model first.
    """
    import warnings

    warnings.warn("copy_cache is deprecated: use nk.as_kvcache(cache, model).to_hf(room)", DeprecationWarning,
                  stacklevel=2)
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    from ..kv.hf import dynamic_cache

    if cache is None:
        return DynamicCache()
    if isinstance(cache, Run):
        if not cache.has_kv:
            raise CacheError("past= got a Run that kept no cache (from a backend without one); use model.run")
        cache = cache.hf_cache if cache.hf_cache is not None else cache.kv
    if not isinstance(cache, Cache):  # a KVCache
        if not hasattr(cache, "keys") or not isinstance(getattr(cache, "keys"), torch.Tensor):
            raise CacheError(f"expected a KVCache, a transformers Cache or a Run, got {type(cache).__name__}")
        return dynamic_cache(cache.keys, cache.values, room)
    filled = [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
    lengths = {layer.keys.shape[2] for layer in filled}
    if len(lengths) > 1:
        raise CacheError(
            f"cache layers hold different numbers of tokens {sorted(lengths)}: a sliding-window "
            "cache has dropped tokens. Prefill through notekv (model.run) to keep every layer full."
        )
    if len(filled) != len(cache.layers):
        return DynamicCache()
    return dynamic_cache([l.keys for l in filled], [l.values for l in filled], room)


def cache_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, n_layers: int):
    """A ``DynamicCache`` from ``{prefix}/kv/{l}/k|v`` entries of a tensor dict."""
    from ..kv.hf import dynamic_cache

    return dynamic_cache([tensors[f"{prefix}/kv/{l}/k"] for l in range(n_layers)],
                         [tensors[f"{prefix}/kv/{l}/v"] for l in range(n_layers)])
