"""nnsight 0.8.1 backend: notekv sites and interventions inside an nnsight trace.

>>> from notekv.backends.nnsight import NNsightBackend
>>> nn_backend = NNsightBackend(model)          # model: a notekv HookedModel
>>> run = nn_backend.run("order_status: shipped", collect=["L3.attn.v"],
...                      interventions=[nk.Ablate("L2.attn.z", at=nk.Last())])

The model is wrapped as ``nnsight.TransformersModel(clone, task="text-generation",
tokenizer=...)``, where ``clone`` is a parameter-sharing copy of ``model.hf``: nnsight
installs a controller on every module's ``forward`` and adds a ``generator`` submodule, so
wrapping ``model.hf`` itself would change the native model. Module paths come from
``model.spec.layout`` (the notekv family table), never from a hard-coded architecture.

Each site is one read (and, when an intervention replaces it, one write) of a module value:

=============== ==========================================================================
resid_pre       decoder layer ``.input``
resid_mid       ``layout.resid_mid`` ``.input`` (absent on parallel-residual models)
resid_post      decoder layer ``.output``
attn_out        ``layout.attn_out`` ``.output`` (first element of the attention tuple)
mlp_out         ``layout.mlp_out`` ``.output``
attn.q_pre/k_pre ``q_norm``/``k_norm`` output when the family has QK-norm, else ``q_proj``/
                ``k_proj`` output; a slice of the fused ``qkv_proj`` output on GPT-NeoX
attn.v          ``v_proj`` output (fused slice on GPT-NeoX)
attn.q / attn.k the output of ``apply_rotary_pos_emb`` in the attention forward (nnsight
                ``.source``); attn.k equals the cached key
attn.z          ``o_proj`` ``.input``
embed / logits  ``layout.embed`` / ``layout.unembed`` ``.output``
=============== ==========================================================================

Values are reshaped to notekv's layout (``[B, H, S, D]`` for head-split sites) before
Collect / Patch / Ablate / Steer / Hook see them and reshaped back when written. Reads
happen in execution order (nnsight refuses a module value the model already ran past), so
the requested sites are sorted by layer and by the order within the layer that one probe
forward measured at construction.

This module registers the ``"nnsight"`` routes of the site map (:func:`nnsight_route`).
Not reachable (:class:`~notekv.hooks.sitemap.UnsupportedError`, a ``NotImplementedError``):
``attn.scores``, ``attn.pattern`` (inside the attention kernel; use the TransformerLens
backend or ``model.run``), ``kv.k``/``kv.v`` (so :class:`~notekv.KVPatch`) and Knockout's
mask; ``notekv.hooks.sitemap.format_support_table()`` has the whole table.

Gradients: ``run(..., interventions=[nk.Tap(site)], grad=True)`` traces with gradients, and
``run.grads(score)`` gives the same gradients as ``model.run``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..hooks.grad import check_grad
from ..hooks.interventions import Intervention
from ..hooks.layouts import from_site, to_site
from ..hooks.run import Run
from ..hooks.sitemap import MASK_SITE, Access, Unsupported, UnsupportedError, module_access, register_executor
from ..hooks.sites import MOE_SITES
from ..hooks.sites import CACHE_SITES, Site
from ..hooks.stop import stop_after
from ..model.arch import ArchSpec
from ._common import OneForward, prepare_inputs, share_params_clone

BACKEND = "nnsight"

_ROPE_OP = "apply_rotary_pos_emb_0"


def nnsight_route(spec: ArchSpec, name: str, layer: int | None) -> Access | Unsupported:
    """The module value nnsight reads for whole site ``name`` of layer ``layer``: a module's
    ``.input``/``.output`` (as for PyTorch hooks), or the RoPE call's output inside the
    attention forward for ``attn.q``/``attn.k``; or why it cannot reach the site."""
    lay = spec.layout
    if name in ("attn.scores", "attn.pattern"):
        return Unsupported("it lives inside the attention kernel")
    if name in CACHE_SITES:
        return Unsupported("it is a cache slot after the update, seen only by the native cache wrapper")
    if name == MASK_SITE:
        return Unsupported("a knockout edits the attention mask notekv's native layer passes to the kernel")
    if name in MOE_SITES:
        return Unsupported("the router's output is (logits, weights, indices) and the experts' one summed tensor: "
                           "replacing the logits must re-route and each expert's output must be split out, which "
                           "only notekv's hook layer does")
    if name in ("attn.q", "attn.k") and lay.positions != "rotary":  # nothing rotates: q is q_pre, k is k_pre
        return module_access(spec, "attn.q_pre" if name == "attn.q" else "attn.k_pre", layer)
    if name in ("attn.q", "attn.k") and lay.kv_expand:
        return Unsupported(f"{spec.model_type} uses latent attention: its RoPE call turns only the rotary part, and "
                           "the keys are expanded per head after the cache (model.run reaches attn.q and attn.k)")
    if name in ("attn.q", "attn.k") and layer is not None and layer < len(spec.rope) \
            and spec.rope[layer].rotary_dim == 0:  # a NoPE layer never calls its RoPE: q is q_pre, k is k_pre
        return module_access(spec, "attn.q_pre" if name == "attn.q" else "attn.k_pre", layer)
    if name in ("attn.q", "attn.k") and lay.rope_call_partial:
        return Unsupported(f"{spec.model_type}'s attention forward turns only the rotary dims in its RoPE call and "
                           "joins the rest after it, so no call output is the whole query / key")
    if name in ("attn.q", "attn.k"):
        return Access(f"{lay.layers}.{layer}.{lay.attn}", "rope", "rope_q" if name == "attn.q" else "rope_k")
    acc = module_access(spec, name, layer)
    return acc if acc is not None else Unsupported(f"no nnsight route for {name}")


register_executor("nnsight", nnsight_route, label="the nnsight backend", column="nnsight",
                  fix="Use model.run for it.")


@dataclass
class _Access:
    """One module value read in the trace: ``path`` (module path from the root), ``kind``
    (``input``, ``output`` or ``rope``: the RoPE call's output inside ``path``), and the
    whole sites served from it, each with how to view it in notekv's layout."""

    order: tuple[int, float]
    path: str
    kind: str
    sites: list[tuple[Site, str]] = field(default_factory=list)


class NNsightBackend:
    """Run notekv sites and interventions through ``nnsight.TransformersModel``.

    ``model``: a :class:`~notekv.HookedModel`. ``hf`` is the clone the wrapper wraps
    (weights shared with ``model.hf``).

    Escape hatch: ``NNsightBackend(model).nnmodel`` is the ``nnsight.TransformersModel``
    itself, for nnsight code as it is written (``with nn.nnmodel.trace(ids): ...``); feed it
    ``model.to_tokens(text)`` so that it reads the tokens notekv reads. A value saved there
    comes back into notekv with :meth:`to_notekv` (the module value converted to notekv's
    layout, e.g. ``o_proj.input`` ``[B, S, H * D]`` -> ``attn.z`` ``[B, H, S, D]``), a
    :class:`~notekv.Patch` source; :meth:`envoy_of` says which module value a site is.

    >>> nn = NNsightBackend(model)
    >>> env, kind = nn.envoy_of("L3.attn.z")            # o_proj, "input"
    >>> with nn.nnmodel.trace(model.to_tokens(clean)):
    ...     z = env.input.save()
    >>> model.run(corrupt, interventions=[nk.Patch("L3.attn.z", nn.to_notekv("L3.attn.z", z), at=nk.Last())])
    """

    name = BACKEND

    def __init__(self, model):
        from nnsight import TransformersModel

        self.model = model
        self.spec = model.spec
        self.hf = share_params_clone(model.hf)
        self._events = self._execution_order()
        self.nnmodel = TransformersModel(self.hf, task="text-generation", tokenizer=copy.deepcopy(model.tokenizer))
        self._rope_ok: dict[int, bool] = {}

    def __repr__(self) -> str:
        return f"NNsightBackend({self.model.name!r})"

    # ------------------------------------------------------------------ sites
    def _execution_order(self) -> dict[tuple[str, str, str], int]:
        """``(decoder layer class, module path within the layer, "input"|"output") -> rank``
        in the order the first layer of each class reads and produces them (one 3-token
        forward with PyTorch hooks, stopped after the last of those layers).

        Families differ (Gemma-3 runs ``v_proj`` before ``q_norm``, Qwen3 after ``k_norm``),
        and nnsight refuses a value the model already ran past, so the order is measured,
        not assumed; every layer is taken to run like the first layer of its class (a hybrid's
        Mamba and attention layers are two classes).
        """
        from ..model.arch import get_submodule

        firsts: dict[str, int] = {}
        for l in range(self.spec.n_layers):
            firsts.setdefault(type(get_submodule(self.hf, self._layer_path(l))).__name__, l)
        events: dict[tuple[str, str, str], int] = {}
        handles = []

        def mark(key):
            def hook(*_):
                events.setdefault(key, len(events))
            return hook

        for cls, l in firsts.items():
            for rel, module in get_submodule(self.hf, self._layer_path(l)).named_modules():
                handles.append(module.register_forward_pre_hook(mark((cls, rel, "input"))))
                handles.append(module.register_forward_hook(mark((cls, rel, "output"))))
        try:
            # the stop is registered after the layer's own "output" mark, so that mark still fires
            with torch.no_grad(), stop_after(get_submodule(self.hf, self._layer_path(max(firsts.values())))):
                self.hf(input_ids=torch.zeros(1, 3, dtype=torch.long, device=self.model.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return events

    def _order(self, s: Site, rel: str, kind: str) -> tuple[int, float]:
        from ..model.arch import get_submodule

        key = (type(get_submodule(self.hf, self._layer_path(s.layer))).__name__, rel, kind)
        if key not in self._events:
            raise self._unsupported(s, f"module {rel or 'the decoder layer'!r} never ran its {kind} in a forward")
        return (s.layer, float(self._events[key]))

    def _layer_path(self, layer: int, rel: str | None = None) -> str:
        base = f"{self.spec.layout.layers}.{layer}"
        return base if rel is None else f"{base}.{rel}"

    def _envoy(self, path: str):
        env = self.nnmodel
        for part in filter(None, path.split(".")):  # "" is the model itself (its output's logits)
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    def _unsupported(self, s: Site, why: str):
        return UnsupportedError(f"site {s}: {why}; not supported by the {BACKEND} backend. Use model.run "
                                "(or the TransformerLens backend) for it.")

    def access_of(self, s: Site) -> tuple[tuple[int, float], str, str, str]:
        """``(order, module path, kind, layout)`` of whole site ``s`` from the site map's
        ``nnsight`` routes; :class:`UnsupportedError` if the backend cannot reach it."""
        acc = self.model.sitemap.route(s.whole).access("nnsight")
        if s.name == "embed":
            return (-1, 0.0), acc.module, acc.kind, acc.layout
        if s.name == "logits":
            return (self.spec.n_layers, 0.0), acc.module, acc.kind, acc.layout
        l = s.layer
        prefix = self._layer_path(l)
        if acc.kind == "rope":
            if l not in self._rope_ok:
                try:
                    self._rope_ok[l] = _ROPE_OP in self._envoy(acc.module).source.names
                except Exception:  # noqa: BLE001 - a forward nnsight cannot instrument
                    self._rope_ok[l] = False
            if not self._rope_ok[l]:
                raise self._unsupported(s, f"no {_ROPE_OP} call found in the attention forward")
            # RoPE runs after the projections (and QK-norms), right before attention and o_proj.
            lay = self.spec.layout
            order = self._order(s, f"{lay.attn}.{lay.o_proj}", "input")
            return (l, order[1] - 0.5), acc.module, acc.kind, acc.layout
        rel = acc.module[len(prefix) + 1:] if acc.module != prefix else ""
        return self._order(s, rel, acc.kind), acc.module, acc.kind, acc.layout

    def envoy_of(self, s) -> tuple[object, str]:
        """``(envoy, kind)``: the nnsight Envoy of whole site ``s`` and what of it the site is:
        ``"input"``, ``"output"``, or ``"rope"`` (the ``apply_rotary_pos_emb`` call's output
        in the attention forward, ``envoy.source``); :class:`UnsupportedError` where nnsight
        cannot reach the site."""
        from ..hooks.sites import site as parse

        _, path, kind, _ = self.access_of(parse(s).whole)
        return self._envoy(path), kind

    def to_notekv(self, s, value) -> torch.Tensor:
        """``value``, the module value an nnsight trace saved for site ``s`` (see
        :meth:`envoy_of`), in notekv's layout: a :class:`~notekv.Patch` source or a Run's value."""
        return self.model.sitemap.to_notekv(s, value, "nnsight")

    # ------------------------------------------------------------------ layouts
    def _apply(self, applier: OneForward, acc: _Access, main):
        """Run the plan at every site served by ``acc`` on ``main``; None if unchanged."""
        changed = False
        for s, layout in acc.sites:
            new = applier.apply(s, to_site(layout, main, self.spec))
            if new is not None:
                main = from_site(layout, main, new, self.spec)
                changed = True
        return main if changed else None

    # ------------------------------------------------------------------ run
    def _plan(self, applier: OneForward) -> list[_Access]:
        accesses: dict[tuple[str, str], _Access] = {}
        for s in applier.sites:
            order, path, kind, view = self.access_of(s)
            acc = accesses.setdefault((path, kind), _Access(order, path, kind))
            acc.order = min(acc.order, order)
            acc.sites.append((s, view))
        return sorted(accesses.values(), key=lambda a: a.order)

    def run(self, inputs, *, collect=(), interventions: tuple[Intervention, ...] | list = (),
            grad: bool = False) -> Run:
        """One forward inside an nnsight trace with notekv interventions; same inputs and Run
        shapes as :meth:`HookedModel.run` (``Run.kv`` is the cache of that forward).
        ``grad=True``: a forward with gradients from the :class:`~notekv.Tap` sites
        (``run.grads(score)``)."""
        check_grad(grad, interventions, "NNsightBackend.run")
        ids, view = prepare_inputs(self.model, inputs)
        applier = OneForward("nnsight", self.model, interventions, collect, view, ids.shape[1])
        plan = self._plan(applier)  # before the trace: errors surface as themselves
        envoys = [self._envoy(a.path) for a in plan]
        result: dict = {}  # created outside the trace (nnsight rule)
        with torch.set_grad_enabled(grad):
            with self.nnmodel.trace(ids.to(self.model.device)):
                for acc, env in zip(plan, envoys):
                    self._step(applier, acc, env)
                result["out"] = self.nnmodel.output
        applier.check_fired(BACKEND)
        out = result["out"]
        hf_cache = getattr(out, "past_key_values", None)
        run = Run(logits=out.logits, acts=applier.acts(), ids=ids, view=view, hf_cache=hf_cache,
                  fingerprint=self.model.fingerprint,
                  kv_factory=None if hf_cache is None else lambda: self.model._kv_of(hf_cache, meta))
        meta = (torch.arange(ids.shape[1]), ids[0].cpu(), ("",) * ids.shape[1])
        run.slot_meta = meta
        run.taps = dict(applier.taps)
        run.sitemap = self.model.sitemap
        return run

    def _step(self, applier: OneForward, acc: _Access, env) -> None:
        """Read one module value inside the trace, apply the handlers, write it back if replaced."""
        if acc.kind == "input":
            new = self._apply(applier, acc, env.input)
            if new is not None:
                env.input = new
        elif acc.kind == "output":
            new = self._apply(applier, acc, env.output)
            if new is not None:
                env.output = new
        else:  # rope
            op = getattr(env.source, _ROPE_OP)
            new = self._apply(applier, acc, op.output)
            if new is not None:
                op.output = new
