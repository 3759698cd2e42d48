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

Not supported (``NotImplementedError``): ``attn.scores``, ``attn.pattern`` (inside the
attention kernel; use the TransformerLens backend or ``model.run``), ``kv.k``/``kv.v``,
:class:`~notekv.Knockout` and :class:`~notekv.KVPatch`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..hooks.interventions import Intervention
from ..hooks.run import Run
from ..hooks.sites import Site
from ._common import Applier, prepare_inputs, share_params_clone

BACKEND = "nnsight"

#: Site names this backend handles.
SUPPORTED_SITES = ("embed", "logits", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                   "attn.q_pre", "attn.k_pre", "attn.v", "attn.q", "attn.k", "attn.z")
UNSUPPORTED_SITES = ("attn.scores", "attn.pattern", "kv.k", "kv.v")

_ROPE_OP = "apply_rotary_pos_emb_0"


class _StopForward(Exception):
    """Ends the execution-order probe after decoder layer 0."""


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

    ``model``: a :class:`~notekv.HookedModel`. ``nnmodel`` is the nnsight wrapper; ``hf``
    the clone it wraps (weights shared with ``model.hf``).
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
    def _execution_order(self) -> dict[tuple[str, str], int]:
        """``(module path within a decoder layer, "input"|"output") -> rank`` in the order
        layer 0 of the clone reads and produces them (one 3-token forward with PyTorch hooks,
        stopped after layer 0).

        Families differ (Gemma-3 runs ``v_proj`` before ``q_norm``, Qwen3 after ``k_norm``),
        and nnsight refuses a value the model already ran past, so the order is measured,
        not assumed; every layer is taken to run like layer 0.
        """
        from ..model.arch import get_submodule

        layer0 = get_submodule(self.hf, self._layer_path(0))
        events: dict[tuple[str, str], int] = {}
        handles = []

        def mark(key):
            def hook(*_):
                events.setdefault(key, len(events))
            return hook

        def stop(*_):
            raise _StopForward

        for rel, module in layer0.named_modules():
            handles.append(module.register_forward_pre_hook(mark((rel, "input"))))
            handles.append(module.register_forward_hook(mark((rel, "output"))))
        handles.append(layer0.register_forward_hook(stop))  # after the layer's own "output" mark
        try:
            with torch.no_grad():
                self.hf(input_ids=torch.zeros(1, 3, dtype=torch.long, device=self.model.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return events

    def _order(self, s: Site, rel: str, kind: str) -> tuple[int, float]:
        if (rel, kind) not in self._events:
            raise self._unsupported(s, f"module {rel or 'the decoder layer'!r} never ran its {kind} in a forward")
        return (s.layer, float(self._events[(rel, kind)]))

    def _layer_path(self, layer: int, rel: str | None = None) -> str:
        base = f"{self.spec.layout.layers}.{layer}"
        return base if rel is None else f"{base}.{rel}"

    def _envoy(self, path: str):
        env = self.nnmodel
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    def _unsupported(self, s: Site, why: str):
        return NotImplementedError(f"site {s}: {why}; not supported by the {BACKEND} backend. Use model.run "
                                   "(or the TransformerLens backend) for it.")

    def access_of(self, s: Site) -> tuple[tuple[int, float], str, str, str]:
        """``(order, module path, kind, view)`` of whole site ``s``; NotImplementedError if the
        backend cannot reach it. ``view`` says how to see the value in notekv's layout."""
        lay = self.spec.layout
        if s.name not in SUPPORTED_SITES:
            why = ("it lives inside the attention kernel" if s.name.startswith("attn.")
                   else "it is a cache slot after the update")
            raise self._unsupported(s, f"{s.name} is not exposed ({why}); supported: {', '.join(SUPPORTED_SITES)}")
        if s.name == "embed":
            return (-1, 0.0), lay.embed, "output", "plain"
        if s.name == "logits":
            return (self.spec.n_layers, 0.0), lay.unembed, "output", "plain"
        l = s.layer

        def at(rel: str, kind: str, view: str):
            path = self._layer_path(l, rel or None)
            return self._order(s, rel, kind), path, kind, view

        if s.name == "resid_pre":
            return at("", "input", "plain")
        if s.name == "resid_post":
            return at("", "output", "first")
        if s.name == "resid_mid":
            parallel = lay.parallel_residual or getattr(self.hf.config, "use_parallel_residual", False)
            if lay.resid_mid is None or parallel:
                raise self._unsupported(s, f"{self.spec.model_type} uses a parallel residual; there is no resid_mid")
            return at(lay.resid_mid, "input", "plain")
        if s.name in ("attn_out", "mlp_out"):
            return at(lay.attn_out if s.name == "attn_out" else lay.mlp_out, "output", "first")
        if s.name == "attn.z":
            return at(f"{lay.attn}.{lay.o_proj}", "input", "flat_q")
        if s.name in ("attn.q", "attn.k"):
            path = self._layer_path(l, lay.attn)
            if l not in self._rope_ok:
                try:
                    self._rope_ok[l] = _ROPE_OP in self._envoy(path).source.names
                except Exception:  # noqa: BLE001 - a forward nnsight cannot instrument
                    self._rope_ok[l] = False
            if not self._rope_ok[l]:
                raise self._unsupported(s, f"no {_ROPE_OP} call found in the attention forward")
            # RoPE runs after the projections (and QK-norms), right before attention and o_proj.
            order = self._order(s, f"{lay.attn}.{lay.o_proj}", "input")
            return (l, order[1] - 0.5), path, "rope", "rope_q" if s.name == "attn.q" else "rope_k"
        # attn.q_pre, attn.k_pre, attn.v: projection outputs
        which = {"attn.q_pre": 0, "attn.k_pre": 1, "attn.v": 2}[s.name]
        if lay.qkv_proj is not None:
            return at(f"{lay.attn}.{lay.qkv_proj}", "output", f"fused{which}")
        kv = "flat_kv" if which else "flat_q"
        if which == 2:
            return at(f"{lay.attn}.{lay.v_proj}", "output", kv)
        norm = lay.q_norm if which == 0 else lay.k_norm
        proj = lay.q_proj if which == 0 else lay.k_proj
        if norm is None:
            return at(f"{lay.attn}.{proj}", "output", kv)
        return at(f"{lay.attn}.{norm}", "output", "plain" if lay.qk_norm_output == "bhsd" else "swap")

    def _check(self, s: Site) -> None:
        self.access_of(s.whole)

    # ------------------------------------------------------------------ layouts
    def _to_notekv(self, view: str, main):
        """The notekv-layout tensor of ``main`` (a view sharing its storage where possible)."""
        spec = self.spec
        if view == "plain":
            return main
        if view == "first":
            return main[0] if isinstance(main, tuple) else main
        if view == "swap":
            return main.transpose(1, 2)
        if view.startswith("flat"):
            b, s = main.shape[:2]
            heads = spec.n_heads if view == "flat_q" else spec.n_kv_heads
            return main.view(b, s, heads, spec.head_dim).transpose(1, 2)
        if view.startswith("fused"):
            i, d = int(view[-1]), spec.head_dim
            b, s = main.shape[:2]
            return main.view(b, s, spec.n_heads, 3 * d)[..., i * d : (i + 1) * d].transpose(1, 2)
        if view.startswith("rope"):
            return main[0] if view == "rope_q" else main[1]
        raise AssertionError(view)

    def _from_notekv(self, view: str, main, new: torch.Tensor):
        """``main`` with the notekv-layout tensor ``new`` written back."""
        spec = self.spec
        if view == "plain":
            return new
        if view == "first":
            return (new,) + tuple(main[1:]) if isinstance(main, tuple) else new
        if view == "swap":
            return new.transpose(1, 2).contiguous()
        if view.startswith("flat"):
            return new.transpose(1, 2).reshape(main.shape)
        if view.startswith("fused"):
            i, d = int(view[-1]), spec.head_dim
            b, s = main.shape[:2]
            out = main.clone().view(b, s, spec.n_heads, 3 * d)
            out[..., i * d : (i + 1) * d] = new.transpose(1, 2)
            return out.reshape(main.shape)
        if view.startswith("rope"):
            i = 0 if view == "rope_q" else 1
            return tuple(new if j == i else x for j, x in enumerate(main))
        raise AssertionError(view)

    def _apply(self, applier: Applier, acc: _Access, main):
        """Run the handlers of every site served by ``acc`` on ``main``; None if unchanged."""
        changed = False
        for s, view in acc.sites:
            new = applier.apply(s, self._to_notekv(view, main))
            if new is not None:
                main = self._from_notekv(view, main, new)
                changed = True
        return main if changed else None

    # ------------------------------------------------------------------ run
    def _plan(self, applier: Applier) -> list[_Access]:
        accesses: dict[tuple[str, str], _Access] = {}
        for s in applier.sites:
            order, path, kind, view = self.access_of(s)
            acc = accesses.setdefault((path, kind), _Access(order, path, kind))
            acc.order = min(acc.order, order)
            acc.sites.append((s, view))
        return sorted(accesses.values(), key=lambda a: a.order)

    def run(self, inputs, *, collect=(), interventions: tuple[Intervention, ...] | list = ()) -> Run:
        """One forward inside an nnsight trace with notekv interventions; same inputs and Run
        shapes as :meth:`HookedModel.run` (``Run.kv`` is the cache of that forward)."""
        ids, view = prepare_inputs(self.model, inputs)
        applier = Applier(BACKEND, self.spec, interventions, collect, view, ids.shape[1], self._check)
        plan = self._plan(applier)  # before the trace: errors surface as themselves
        envoys = [self._envoy(a.path) for a in plan]
        result: dict = {}  # created outside the trace (nnsight rule)
        with torch.no_grad():
            with self.nnmodel.trace(ids.to(self.model.device)):
                for acc, env in zip(plan, envoys):
                    self._step(applier, acc, env)
                result["out"] = self.nnmodel.output
        applier.check_fired()
        out = result["out"]
        return Run(logits=out.logits, acts=applier.acts(), kv=getattr(out, "past_key_values", None),
                   ids=ids, view=view)

    def _step(self, applier: Applier, acc: _Access, env) -> None:
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
