"""The HookLayer: the native executor of a plan, the one place interventions touch a model.

``with model.hooks(*interventions): ...`` compiles the interventions into a
:class:`~notekv.hooks.plan.Plan`, registers PyTorch hooks only on the modules its sites need
(their routes in the model's :class:`~notekv.hooks.sitemap.SiteMap`), and removes every one
of them (and restores the attention implementation) on exit, also after an exception.

How each kind of access is reached:

* ``output`` / ``input``: forward hooks and pre-hooks on the route's module;
* ``cache_new`` / ``cache_full`` (``attn.k``, ``attn.v``, ``kv.k``, ``kv.v``, :class:`KVPatch`):
  a wrapper on the ``update`` method of the cache object that passes through the model
  (instance-level, removed on exit); a cache is supplied when the caller passes none;
* ``attention`` (``attn.q``, ``attn.scores``, ``attn.pattern``): notekv's attention function,
  selected only while such a site is requested;
* ``mask`` (:class:`Knockout`): a pre-hook on the attention module that folds blocked cells
  into the attention mask it receives, so the model's own kernel (SDPA) still runs.
* ``router`` / ``experts`` (``moe.router``, ``moe.experts``, :class:`~notekv.ExpertKnockout`):
  forward hooks on the mixture-of-experts router and experts modules (:mod:`notekv.hooks.moe`).

A base-model pre-hook tracks each forward's slots (``past_len .. past_len + S - 1``) and
step (0 = first forward in the context, i.e. prefill), so absolute-position interventions hit
the right slice in every decode step of ``generate``; with a ``prompt``, it refuses a forward
whose tokens are not the prompt's. A forward started from inside an operation (a plain
``model.hf(...)`` call in a Hook function) gets its own slots and step, and the enclosing
forward's are restored when the operation returns.

Contexts nest: every context entered on a model applies to every forward of it, in the
order they were entered, except that a context entered by ``model.run`` or
``model.generate`` while a forward of the model is in progress (from inside a Hook function)
isolates its forward: the contexts entered before it pass that forward through untouched,
so a nested ``model.run`` sees only its own interventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConcurrencyError
from ..model.arch import ArchSpec, get_submodule
from ..model.attnmath import visible
from . import attention as attn_impl
from . import latent
from . import moe
from .interventions import Intervention
from .layouts import from_site, to_site
from .plan import Executor, HookContext
from .positions import TokenView
from .sitemap import MASK_SITE, Access, Unsupported, module_access, register_executor
from .sites import CACHE_SITES, MOE_SITES, Site, SiteError

__all__ = ["HookContext", "HookLayer", "native_route"]

#: How long a hook context waits for another thread's context on the same model.
LOCK_TIMEOUT_S = 600.0


class MaskEdit:
    """The cells a knockout blocks in one attention call: ``block(rows, q_local, heads, keys)``
    marks batch rows x query rows x heads x key columns; the executor folds them into the
    attention mask afterwards (and leaves the call untouched when nothing was blocked)."""

    def __init__(self, batch: int, n_queries: int, n_keys: int):
        self.batch, self.n_queries, self.n_keys = batch, n_queries, n_keys
        self.cells: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def see_only(self, q_local: torch.Tensor, ok: torch.Tensor) -> None:
        """Replace the model's mask for query rows ``q_local`` (every batch row and head) by
        ``ok`` (bool ``[len(q_local), n_keys]``: which keys they see); blocks still apply after."""
        self.views.append((q_local, ok))

    def block(self, rows: torch.Tensor, q_local: torch.Tensor, heads: torch.Tensor, keys: torch.Tensor) -> None:
        self.cells.append((rows, q_local, heads, keys))


class HookLayer(Executor):
    """Context manager applying ``interventions`` to ``model`` (a HookedModel)."""

    executor = "native"

    def __init__(self, model, interventions: tuple[Intervention, ...], view: TokenView | None = None,
                 supply_cache: bool = True, horizon: int | None = None, *, isolate: bool = False,
                 position_offset: int = 0):
        super().__init__(model, interventions, view, horizon)
        self.hf: nn.Module = model.hf
        self.supply_cache = supply_cache
        #: Entered from inside an operation (a Hook function) of another context, an isolating
        #: context suspends the contexts entered before it (``model.run`` / ``generate`` ask).
        self.isolate = isolate
        self.isolating = False
        #: Added to the RoPE positions of every forward (generate continuing a moved cache).
        self.position_offset = int(position_offset)
        self.cache = None  # the cache object of the last forward
        self._handles: list = []
        self._patched_caches: list = []
        self._patched_modules: list[nn.Module] = []
        self._uses_attention = False
        self._locked = False
        kinds = {s: s.route.access("native").kind for s in self.plan.steps}
        self._cache_sites = {st.site for st, k in kinds.items() if k in ("cache_new", "cache_full")}
        self._attn_layers = {st.site.layer for st, k in kinds.items() if k == "attention"}

    # ----------------------------------------------------------------- entry points
    def apply_attention_site(self, name: str, t: torch.Tensor, layer: int) -> torch.Tensor:
        """Entry point used by the attention function for ``attn.q``/``scores``/``pattern``."""
        s = Site(name, layer)
        if not self.plan.at(s) or self.suspended():
            return t
        return self.dispatch(s, t)

    def suspended(self) -> bool:
        """Whether forwards now pass through this context: it has exited, or an isolating
        context (a ``model.run`` from inside a forward) was entered after it."""
        contexts = self.model.state.contexts
        for i, c in enumerate(contexts):
            if c is self:
                return any(later.isolating for later in contexts[i + 1:])
        return True

    # ----------------------------------------------------------------- hooks by access kind
    def _out_hook(self, site: Site, layout: str):
        def hook(module, args, output):
            if self.suspended():
                return None
            view = to_site(layout, output, self.spec)
            new = self.dispatch(site, view)
            return None if new is view else from_site(layout, output, new, self.spec)
        return hook

    def _in_hook(self, site: Site, layout: str):
        def hook(module, args, kwargs):
            if self.suspended():
                return None
            raw = args[0] if args else kwargs["hidden_states"]
            view = to_site(layout, raw, self.spec)
            new = self.dispatch(site, view)
            if new is view:
                return None
            new = from_site(layout, raw, new, self.spec)
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    def _mask_hook(self, site: Site):
        """Pre-hook on the attention module: fold the plan's blocked cells into its mask.

        A knockout is an additive -inf (bool False) on (row, head, query, key) of the mask the
        model already passes; a knockout that blocks nothing leaves the call untouched
        (bit-identical logits).
        """
        layer = site.layer
        window = self.spec.window_of(layer)
        n_heads = self.spec.n_heads

        def hook(module, args, kwargs):
            if self.suspended():
                return None
            q = self.slots
            hidden = args[0] if args else kwargs["hidden_states"]
            b, n_q, n_k = hidden.shape[0], len(q), int(q[-1]) + 1
            edit = MaskEdit(b, n_q, n_k)
            self.dispatch(site, edit)
            if not edit.cells and not edit.views:
                return None
            mask = kwargs.get("attention_mask")
            if mask is None:  # the kernel was going to use its causal flag: spell the mask out
                mask = visible(q, torch.arange(n_k), window)[None, None].to(hidden.device)
            mask = mask[..., :n_k].expand(b, n_heads, n_q, n_k).clone()
            blocked = False if mask.dtype == torch.bool else float("-inf")
            dev = mask.device
            for ql, ok in edit.views:
                ok = ok.to(dev)[None, None].expand(b, n_heads, -1, -1)
                mask[:, :, ql.to(dev), :] = ok if mask.dtype == torch.bool else torch.where(
                    ok, torch.zeros((), dtype=mask.dtype, device=dev), torch.full((), blocked, dtype=mask.dtype, device=dev))
            for rows, ql, heads, cols in edit.cells:
                mask[rows.to(dev)[:, None, None], heads.to(dev)[None, :, None], ql.to(dev)[:, None, None],
                     cols.to(dev)[None, None, :]] = blocked
            dead = ~mask.any(-1) if mask.dtype == torch.bool else mask.amax(-1) <= torch.finfo(mask.dtype).min / 2
            # With attention sinks a query that loses every key still attends to its sink (its
            # head's output is then 0); without, its softmax would be 0/0.
            if bool(dead.any()) and not self.spec.layout.attn_sinks:
                _, h, r = (int(x[0]) for x in dead.nonzero(as_tuple=True))
                raise attn_impl.KnockoutError(
                    f"knockout at layer {layer} leaves the query at slot {int(q[0]) + r} (head {h}) with no "
                    "key to attend to; keep at least one key (e.g. the first token, an attention sink) "
                    "outside the knocked-out source positions"
                )
            return args, {**kwargs, "attention_mask": mask}
        return hook

    def _base_pre_hook(self, needs_cache: bool):
        def hook(module, args, kwargs):
            if self.suspended():
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            n = (ids if ids is not None else embeds).shape[1]
            cache = kwargs.get("past_key_values")
            if cache is None and needs_cache:
                from ..kv.hf import empty_cache

                cache = empty_cache(self.model)
                kwargs = {**kwargs, "past_key_values": cache, "use_cache": True}
            past = cache.get_seq_length() if cache is not None else 0
            self.step += 1
            self.slots = torch.arange(past, past + n)
            if self.prompt_slots is None:
                self.prompt_slots = (past, n)
            self.check_ids(ids, self.slots)
            if self.position_offset:
                pos = kwargs.get("position_ids")
                if pos is None:
                    b = (ids if ids is not None else embeds).shape[0]
                    pos = self.slots[None].expand(b, -1).to((ids if ids is not None else embeds).device)
                kwargs = {**kwargs, "position_ids": pos + self.position_offset}
            if cache is not None and cache is not self.cache:
                self._wrap_cache(cache)
            self.cache = cache
            return args, kwargs
        return hook

    def _wrap_cache(self, cache) -> None:
        if not self._cache_sites:
            return
        previous = vars(cache).get("update")  # another active context's wrapper, if any
        original = cache.update
        sites = self._cache_sites
        # The wrapper reads its switch from this dict, never through its own name: a function
        # that refers to itself is a reference cycle, and the cycle would keep the whole cache
        # (every row of a batched step) alive until the garbage collector happens to run.
        flags = {"active": True}

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            if not flags["active"] or self.suspended():  # exited, or an isolated forward: pass through
                return original(key_states, value_states, layer_idx, *args, **kwargs)
            cur = self.slots
            k_site, v_site = Site("attn.k", layer_idx), Site("attn.v", layer_idx)
            if k_site in sites:
                key_states = self.dispatch(k_site, key_states, cur)
            if v_site in sites:
                value_states = self.dispatch(v_site, value_states, cur)
            keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
            full = torch.arange(keys.shape[2])
            for name, t in (("kv.k", keys), ("kv.v", values)):
                s = Site(name, layer_idx)
                if s in sites:
                    new = self.dispatch(s, t, full)
                    if new is not t:
                        t.copy_(new)
            return keys, values

        update.flags = flags
        update.previous = previous
        cache.update = update
        self._patched_caches.append((cache, update))

    # ----------------------------------------------------------------- registration
    def __enter__(self) -> "HookLayer":
        """Take the model (one hook context at a time per model; other threads wait, the same
        thread may nest contexts) and register the plan's hooks."""
        lock = self.model.state.lock
        if not lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise ConcurrencyError(
                f"{self.model.name} has been inside another thread's notekv hook context for {LOCK_TIMEOUT_S:.0f} s; "
                "use one model per thread (nk.load twice, or model copies) or wait for the other run"
            )
        self._locked = True
        contexts = self.model.state.contexts
        # Entered from inside an operation (a Hook function) of another context: isolate.
        self.isolating = self.isolate and any(c.dispatching for c in contexts)
        contexts.append(self)
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def _reg(self, path: str, kind: str, fn) -> None:
        module = get_submodule(self.hf, path)
        if kind == "pre":
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn))

    def _register(self) -> None:
        layout = self.spec.layout
        base = layout.layers.rsplit(".", 1)[0]
        self._reg(base, "pre", self._base_pre_hook(bool(self._cache_sites) and self.supply_cache))
        self._handles += latent.install(self.hf, self.spec)  # MLA: cache per-head K/V (no-op elsewhere)
        for s in sorted(self.plan.sites, key=lambda x: (x.layer if x.layer is not None else -1, x.name)):
            acc = self.plan.at(s)[0].route.access("native")
            if acc.kind == "output":
                self._reg(acc.module, "out", self._out_hook(s, acc.layout))
            elif acc.kind == "input":
                self._reg(acc.module, "pre", self._in_hook(s, acc.layout))
            elif acc.kind == "mask":
                self._reg(acc.module, "pre", self._mask_hook(s))
            elif acc.kind in ("router", "experts"):  # mixture-of-experts sites
                self._handles.append(moe.register(self, s, acc))
        if self._attn_layers:
            attn_impl.ensure_registered()
            users = self.model.state.attention_users
            if not users:  # the first context that needs notekv's attention saves the model's own
                self.model.state.saved_attention = self.hf.config._attn_implementation
            users.append(self)
            self._uses_attention = True
            self.hf.config._attn_implementation = attn_impl.IMPLEMENTATION
            for l in self._attn_layers:
                module = get_submodule(self.hf, f"{layout.layers}.{l}.{layout.attn}")
                chain = vars(module).setdefault("_notekv_attention", _AttentionChain())
                chain.handlers.append(_AttentionHandler(self, l))
                self._patched_modules.append(module)

    def _remove(self) -> None:
        """Undo everything this context did, whatever other contexts did since (contexts may
        exit in any order)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cache, wrapper in self._patched_caches:
            wrapper.flags["active"] = False
            if vars(cache).get("update") is wrapper:  # on top: hand back what it wrapped
                if wrapper.previous is None:
                    vars(cache).pop("update", None)
                else:
                    cache.update = wrapper.previous
        self._patched_caches.clear()
        for module in self._patched_modules:
            chain = vars(module).get("_notekv_attention")
            if chain is not None:
                chain.handlers = [h for h in chain.handlers if h.hook_layer is not self]
                if not chain.handlers:
                    vars(module).pop("_notekv_attention", None)
        self._patched_modules.clear()
        if self._uses_attention:
            users = self.model.state.attention_users
            users[:] = [u for u in users if u is not self]
            if not users:  # the last context out restores the model's own attention
                self.hf.config._attn_implementation = self.model.state.saved_attention
            self._uses_attention = False
        contexts = self.model.state.contexts
        contexts[:] = [c for c in contexts if c is not self]
        if self._locked:
            self._locked = False
            self.model.state.lock.release()

    def __exit__(self, *exc) -> None:
        self._remove()

    def _frame(self):
        return self.step, self.slots, self.cache

    def _restore(self, frame) -> None:
        self.step, self.slots, self.cache = frame

    def acts(self, site_name: str) -> list[torch.Tensor]:
        """Collected tensors for a site, one per forward (step)."""
        from .sites import site as parse

        return self.collected[str(parse(site_name))]


class _AttentionChain:
    """What notekv's attention function finds on a module: the handlers of every active
    context that hooks this layer's attention, run in the order the contexts were entered."""

    def __init__(self):
        self.handlers: list[_AttentionHandler] = []

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for h in self.handlers:
            t = h.apply(name, t)
        return t


@dataclass
class _AttentionHandler:
    hook_layer: HookLayer
    layer: int

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.hook_layer.apply_attention_site(name, t, self.layer)


# ---------------------------------------------------------------------- the native routes
def native_route(spec: ArchSpec, name: str, layer: int | None) -> Access | Unsupported:
    """Where the native hook layer reaches whole site ``name`` of layer ``layer``: module
    hooks for module values, the cache wrapper for ``attn.k``/``attn.v`` (``cache_new``) and
    ``kv.*`` (``cache_full``), notekv's attention function for ``attn.q``/``scores``/
    ``pattern``, and the attention module's mask for :class:`~notekv.Knockout`."""
    lay = spec.layout
    attn = f"{lay.layers}.{layer}.{lay.attn}"
    if name in ("attn.k", "attn.v"):
        return Access(attn, "cache_new")
    if name in ("attn.q", "attn.scores", "attn.pattern"):
        return Access(attn, "attention")
    if name in CACHE_SITES:
        return Access(attn, "cache_full")
    if name == MASK_SITE:
        return Access(attn, "mask")
    if name in MOE_SITES:
        return moe.native_access(spec, name, layer)
    acc = module_access(spec, name, layer)
    return acc if acc is not None else Unsupported(f"no native route for {name}")


register_executor("native", native_route, label="notekv's hook layer", column="native", refusal=SiteError)
