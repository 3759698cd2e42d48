"""The HookLayer: the one place where interventions touch a running model.

``with model.hooks(*interventions): ...`` compiles the interventions into per-site handlers,
registers PyTorch hooks only on the modules those sites need, and removes every one of them
(and restores the attention implementation) on exit, also after an exception.

How each site is reached:

* module outputs / inputs (``resid_*``, ``attn_out``, ``mlp_out``, ``embed``, ``logits``,
  ``attn.q_pre``, ``attn.k_pre``, ``attn.z``): forward hooks and pre-hooks;
* cache slots (``attn.k``, ``attn.v``, ``kv.k``, ``kv.v``, :class:`KVPatch`): a wrapper on the
  ``update`` method of the cache object that passes through the model (instance-level,
  removed on exit); a cache is supplied when the caller passes none;
* attention internals (``attn.q``, ``attn.scores``, ``attn.pattern``, :class:`Knockout`):
  notekv's attention function, selected only while such a site is requested.

A base-model pre-hook tracks each forward's slots (``past_len .. past_len + S - 1``) and
step (0 = first forward in the context, i.e. prefill), so absolute-position interventions hit
the right slice in every decode step of ``generate``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..model.arch import ArchSpec, get_submodule
from . import attention as attn_impl
from .apply import HookContext, Handler, make_handler, take
from .interventions import Intervention, Knockout, KVPatch
from .positions import TokenView, resolve
from .sites import Site

MODULE_OUT = {"resid_post", "attn_out", "mlp_out", "embed", "logits"}
MODULE_IN = {"resid_pre", "resid_mid"}
PROJ_OUT = {"attn.q_pre", "attn.k_pre"}
CACHE_CURRENT = {"attn.k", "attn.v"}
CACHE_FULL = {"kv.k", "kv.v"}
ATTN_INTERNAL = {"attn.q", "attn.scores", "attn.pattern"}


class HookLayer:
    """Context manager applying ``interventions`` to ``model`` (a HookedModel)."""

    def __init__(self, model, interventions: tuple[Intervention, ...], view: TokenView | None = None,
                 supply_cache: bool = True):
        self.model = model
        self.hf: nn.Module = model.hf
        self.spec: ArchSpec = model.spec
        self.interventions = tuple(interventions)
        self.view = view
        self.supply_cache = supply_cache
        self.collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.step = -1
        self.slots = torch.arange(0)
        self.cache = None  # the cache object of the last forward
        self._handles: list = []
        self._patched_caches: list = []
        self._patched_modules: list[nn.Module] = []
        self._saved_attn = None
        self._resolved: dict[tuple[int, str], list[int] | None] = {}
        self._handlers: dict[Site, list[tuple[Site, Handler]]] = defaultdict(list)
        self._knockouts: dict[int, list[Knockout]] = defaultdict(list)
        self._kv_patches: dict[int, list[KVPatch]] = defaultdict(list)
        self._compile()

    # ----------------------------------------------------------------- compile
    def _slots_of(self, owner: object, at, tag: str = "") -> list[int] | None:
        """Resolve a selector once (at the first forward, when the prompt length is known)."""
        k = (id(owner), tag)
        if k not in self._resolved:
            view = self.view
            if view is None:
                n = int(self.slots[-1]) + 1 if len(self.slots) else 0
                self._resolved[k] = resolve(at, None, n_tokens=n)
            else:
                self._resolved[k] = resolve(at, view)
        return self._resolved[k]

    def _compile(self) -> None:
        n = self.spec.n_layers
        for iv in self.interventions:
            for s in iv.sites(n):
                s.check(n, self.spec.n_heads, self.spec.n_kv_heads)
            if isinstance(iv, Knockout):
                for l in iv.layer_list(n):
                    self._knockouts[l].append(iv)
            elif isinstance(iv, KVPatch):
                for l in iv.layer_list(n):
                    self._kv_patches[l].append(iv)
                    for w in iv.which:
                        self._handlers[Site(f"kv.{w}", l)].append((Site(f"kv.{w}", l), self._kv_patch(iv, w, l)))
            else:
                s = iv.site
                self._handlers[s.whole].append((s, self._make_handler(iv)))

    def _make_handler(self, iv: Intervention) -> Handler:
        return make_handler(iv, self._slots_of, lambda key, x: self.collected[key].append(x))

    def _kv_patch(self, iv: KVPatch, which: str, layer: int) -> Handler:
        def fn(t, ctx):
            src = _source_cache_tensor(iv.source, layer, which)
            slots = self._slots_of(iv, iv.at)
            if slots is None:  # every slot the source holds
                slots = list(range(min(t.shape[2], src.shape[2])))
            slots = [s for s in slots if s < t.shape[2]]
            if not slots:
                return None
            vals = take(src, 2, slots, Site(f"kv.{which}", layer))
            idx = torch.tensor(slots, device=t.device)
            heads = list(iv.heads) if iv.heads is not None else None
            if heads is None:
                t[:, :, idx] = vals.to(t).expand(t.shape[0], -1, -1, -1)
            else:
                h = torch.tensor(heads, device=t.device)
                t[:, h[:, None], idx[None, :]] = vals[:, h].to(t).expand(t.shape[0], -1, -1, -1)
            return None
        return fn

    # ----------------------------------------------------------------- dispatch
    def _dispatch(self, site: Site, t: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        ctx = HookContext(site, self.slots if slots is None else slots, self.step, self)
        for _, handler in self._handlers.get(site, ()):
            new = handler(t, ctx)
            if new is not None:
                if new.shape != t.shape:
                    raise ValueError(f"hook at {site} returned shape {tuple(new.shape)}, expected {tuple(t.shape)}")
                t = new
        return t

    def run(self, name: str, t: torch.Tensor, layer: int) -> torch.Tensor:
        """Entry point used by the attention function for ``attn.q``/``scores``/``pattern``."""
        s = Site(name, layer)
        if s not in self._handlers:
            return t
        return self._dispatch(s, t)

    def _knockout_hook(self, layer: int):
        """Pre-hook on the attention module: fold the knockouts into its attention mask.

        Knockout is an additive -inf (bool False) on (head, query row, key column) of the
        mask the model already passes, so the model's own attention kernel (SDPA) runs; a
        knockout that resolves to nothing leaves the call untouched (bit-identical logits).
        """
        kos = self._knockouts[layer]
        window = self.spec.window_of(layer)
        n_heads = self.spec.n_heads

        def hook(module, args, kwargs):
            q = self.slots
            q_first, n_q, n_k = int(q[0]), len(q), int(q[-1]) + 1
            cells = []
            for ko in kos:
                src = self._slots_of(ko, ko.src, "src")
                dst = self._slots_of(ko, ko.dst, "dst")
                rows = list(range(n_q)) if dst is None else [d - q_first for d in dst if q_first <= d < q_first + n_q]
                cols = list(range(n_k)) if src is None else [c for c in src if c < n_k]
                heads = list(range(n_heads)) if ko.heads is None else list(ko.heads)
                if rows and cols:
                    cells.append((torch.tensor(heads), torch.tensor(rows), torch.tensor(cols)))
            if not cells:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            if mask is None:  # the kernel was going to use its causal flag: spell the mask out
                keys = torch.arange(n_k)
                allowed = keys[None, :] <= q[:, None]
                if window is not None:
                    allowed &= (q[:, None] - keys[None, :]) < window
                mask = allowed[None, None].to(hidden.device)
            mask = mask[..., :n_k].expand(hidden.shape[0], n_heads, n_q, n_k).clone()
            blocked = False if mask.dtype == torch.bool else float("-inf")
            for h, r, c in cells:
                mask[:, h[:, None, None], r[None, :, None], c[None, None, :]] = blocked
            dead = ~mask.any(-1) if mask.dtype == torch.bool else mask.amax(-1) <= torch.finfo(mask.dtype).min / 2
            if bool(dead.any()):
                b, h, r = (int(x[0]) for x in dead.nonzero(as_tuple=True))
                raise attn_impl.KnockoutError(
                    f"knockout at layer {layer} leaves the query at slot {q_first + r} (head {h}) with no "
                    "key to attend to; keep at least one key (e.g. the first token, an attention sink) "
                    "outside the knocked-out source positions"
                )
            return args, {**kwargs, "attention_mask": mask}
        return hook

    # ----------------------------------------------------------------- registration
    def _reg(self, module: nn.Module, kind: str, fn) -> None:
        if kind == "pre":
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn))

    def _layer(self, l: int, rel: str | None = None) -> nn.Module:
        layer = get_submodule(self.hf, self.spec.layout.layers)[l]
        return layer if rel is None else get_submodule(layer, rel)

    def _out_hook(self, site: Site):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self._dispatch(site, output[0]),) + tuple(output[1:])
            return self._dispatch(site, output)
        return hook

    def _in_hook(self, site: Site):
        def hook(module, args, kwargs):
            if args:
                return (self._dispatch(site, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._dispatch(site, kwargs["hidden_states"])
            return args, kwargs
        return hook

    def _proj_hook(self, site: Site, fused_index: int | None, heads_first: bool = False):
        spec = self.spec
        n_heads = spec.n_heads if site.name == "attn.q_pre" else spec.n_kv_heads

        def hook(module, args, output):
            b, s = output.shape[:2]
            if fused_index is not None:  # NeoX fused qkv: [B, S, H * 3D] laid out per head
                view = output.view(b, s, spec.n_heads, 3 * spec.head_dim)
                part = view[..., fused_index * spec.head_dim : (fused_index + 1) * spec.head_dim]
                new = self._dispatch(site, part.transpose(1, 2))
                view = view.clone()
                view[..., fused_index * spec.head_dim : (fused_index + 1) * spec.head_dim] = new.transpose(1, 2)
                return view.reshape(output.shape)
            if heads_first:  # already [B, H, S, D]
                return self._dispatch(site, output)
            heads = output.view(b, s, n_heads, spec.head_dim).transpose(1, 2)
            new = self._dispatch(site, heads)
            return new.transpose(1, 2).reshape(output.shape)
        return hook

    def _z_hook(self, site: Site):
        spec = self.spec

        def hook(module, args, kwargs):
            x = args[0]
            b, s = x.shape[:2]
            heads = x.view(b, s, spec.n_heads, spec.head_dim).transpose(1, 2)
            new = self._dispatch(site, heads)
            return (new.transpose(1, 2).reshape(x.shape),) + tuple(args[1:]), kwargs
        return hook

    def _base_pre_hook(self, needs_cache: bool):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            n = (ids if ids is not None else embeds).shape[1]
            cache = kwargs.get("past_key_values")
            if cache is None and needs_cache:
                from transformers import DynamicCache

                cache = DynamicCache()
                kwargs = {**kwargs, "past_key_values": cache, "use_cache": True}
            past = cache.get_seq_length() if cache is not None else 0
            self.step += 1
            self.slots = torch.arange(past, past + n)
            if cache is not None and cache is not self.cache:
                self._wrap_cache(cache)
            self.cache = cache
            return args, kwargs
        return hook

    def _wrap_cache(self, cache) -> None:
        if not (self._cache_sites or self._kv_patches):
            return
        if "update" in vars(cache):
            raise RuntimeError("this cache is already hooked by another active notekv HookLayer")
        original = cache.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            cur = self.slots
            k_site, v_site = Site("attn.k", layer_idx), Site("attn.v", layer_idx)
            if k_site in self._handlers:
                key_states = self._dispatch(k_site, key_states, cur)
            if v_site in self._handlers:
                value_states = self._dispatch(v_site, value_states, cur)
            keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
            full = torch.arange(keys.shape[2])
            for name, t in (("kv.k", keys), ("kv.v", values)):
                s = Site(name, layer_idx)
                if s in self._handlers:
                    new = self._dispatch(s, t, full)
                    if new is not t:
                        t.copy_(new)
            return keys, values

        cache.update = update
        self._patched_caches.append(cache)

    def __enter__(self) -> "HookLayer":
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def _register(self) -> None:
        layout = self.spec.layout
        sites = set(self._handlers)
        self._cache_sites = {s for s in sites if s.name in CACHE_CURRENT | CACHE_FULL}
        needs_attn = {s.layer for s in sites if s.name in ATTN_INTERNAL}
        base = get_submodule(self.hf, layout.layers.rsplit(".", 1)[0])
        self._handles.append(base.register_forward_pre_hook(
            self._base_pre_hook(bool(self._cache_sites) and self.supply_cache), with_kwargs=True))
        for s in sorted(sites, key=lambda x: (x.layer if x.layer is not None else -1, x.name)):
            if s.name == "embed":
                self._reg(get_submodule(self.hf, layout.embed), "out", self._out_hook(s))
            elif s.name == "logits":
                self._reg(get_submodule(self.hf, layout.unembed), "out", self._out_hook(s))
            elif s.name == "resid_pre":
                self._reg(self._layer(s.layer), "pre", self._in_hook(s))
            elif s.name == "resid_mid":
                if layout.resid_mid is None:
                    raise ValueError(f"{s}: {self.spec.model_type} uses a parallel residual; there is no resid_mid")
                self._reg(self._layer(s.layer, layout.resid_mid), "pre", self._in_hook(s))
            elif s.name == "resid_post":
                self._reg(self._layer(s.layer), "out", self._out_hook(s))
            elif s.name in ("attn_out", "mlp_out"):
                rel = layout.attn_out if s.name == "attn_out" else layout.mlp_out
                self._reg(self._layer(s.layer, rel), "out", self._out_hook(s))
            elif s.name in PROJ_OUT:
                self._reg_proj(s)
            elif s.name == "attn.z":
                self._reg(self._layer(s.layer, f"{layout.attn}.{layout.o_proj}"), "pre", self._z_hook(s))
        for l in self._knockouts:
            self._reg(self._layer(l, layout.attn), "pre", self._knockout_hook(l))
        if needs_attn:
            attn_impl.ensure_registered()
            self._saved_attn = self.hf.config._attn_implementation
            self.hf.config._attn_implementation = attn_impl.IMPLEMENTATION
            for l in needs_attn:
                module = self._layer(l, layout.attn)
                module._notekv_attention = _AttentionHandler(self, l)
                self._patched_modules.append(module)

    def _reg_proj(self, s: Site) -> None:
        layout = self.spec.layout
        q = s.name == "attn.q_pre"
        if layout.qkv_proj is not None:
            self._reg(self._layer(s.layer, f"{layout.attn}.{layout.qkv_proj}"), "out",
                      self._proj_hook(s, 0 if q else 1))
            return
        norm = layout.q_norm if q else layout.k_norm
        proj = layout.q_proj if q else layout.k_proj
        heads_first = norm is not None and layout.qk_norm_output == "bhsd"
        self._reg(self._layer(s.layer, f"{layout.attn}.{norm or proj}"), "out",
                  self._proj_hook(s, None, heads_first))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cache in self._patched_caches:
            vars(cache).pop("update", None)
        self._patched_caches.clear()
        for module in self._patched_modules:
            vars(module).pop("_notekv_attention", None)
        self._patched_modules.clear()
        if self._saved_attn is not None:
            self.hf.config._attn_implementation = self._saved_attn
            self._saved_attn = None

    def __exit__(self, *exc) -> None:
        self._remove()

    def acts(self, site_name: str) -> list[torch.Tensor]:
        """Collected tensors for a site, one per forward (step)."""
        from .sites import site as parse

        return self.collected[str(parse(site_name))]


@dataclass
class _AttentionHandler:
    hook_layer: HookLayer
    layer: int

    def run(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.hook_layer.run(name, t, self.layer)


def _source_cache_tensor(source, layer: int, which: str) -> torch.Tensor:
    from .run import Run

    cache = source.kv if isinstance(source, Run) else source
    if cache is None or not hasattr(cache, "layers"):
        raise TypeError("KVPatch source must be a Run with a cache or a transformers cache")
    if layer >= len(cache.layers):
        raise IndexError(f"KVPatch source cache has {len(cache.layers)} layers, layer {layer} requested")
    lay = cache.layers[layer]
    return lay.keys if which == "k" else lay.values
