"""TransformerLens 4.3 backend: notekv sites and interventions on a ``TransformerBridge``.

>>> from notekv.backends.tl import TLBackend
>>> tl = TLBackend(model)                       # model: a notekv HookedModel
>>> run = tl.run("order_status: shipped", collect=["L3.resid_post", "L3.attn.k"])
>>> run.acts["L3.attn.k"].shape                 # [B, H_kv, S, D], as in model.run

The bridge is booted on a parameter-sharing clone of ``model.hf`` (TransformerLens switches
its model to eager attention in place; the clone keeps ``model.hf`` untouched while sharing
its weights). Each notekv site maps to one bridge hook (this module registers the ``"tl"``
routes of the site map: :func:`tl_route`); head-split
activations are converted between TransformerLens's ``[B, S, H, D]`` and notekv's
``[B, H, S, D]`` in both directions, so Collect, Patch, Ablate, Steer and Hook see exactly
what they see in ``model.run``.

What it cannot reach is in the site map (``notekv.hooks.sitemap.format_support_table()``):
the cache sites ``kv.k`` / ``kv.v`` (so :class:`~notekv.KVPatch`), Knockout's mask (use
``model.run``, or a :class:`~notekv.Hook` on ``attn.scores`` for a knockout by hand), and
``attn.q``/``attn.k`` on GPT-NeoX; besides, any hook the bridge of a given model does not
expose or never fires is refused when the backend is built. Refusals raise
:class:`~notekv.hooks.sitemap.UnsupportedError` (a ``NotImplementedError``). ``Run.kv`` is None.

Gradients: ``run(..., interventions=[nk.Tap(site)], grad=True)`` runs the bridge with
gradients, and ``run.grads(score)`` gives the same gradients as ``model.run``.

The bridge always computes eager attention. Against a native model on SDPA the results
agree to float rounding only (about 5e-5 on SmolLM2's logits); with
``model.hf.config._attn_implementation = "eager"`` before building the backend they are
bit-identical on the models tested (tiny Llama / Qwen3 / Gemma-3, SmolLM2).
"""

from __future__ import annotations

import copy

import torch

from ..hooks.grad import check_grad
from ..hooks.interventions import Intervention
from ..hooks.layouts import from_site, to_site
from ..hooks.run import Run
from ..hooks.sitemap import MASK_SITE, Access, Unsupported, UnsupportedError, register_executor
from ..hooks.sites import MOE_SITES
from ..hooks.sites import ATTN_MAP_SITES, CACHE_SITES, GLOBAL_SITES, LAYER_SITES, TL_NAME_OF, Site
from ..hooks.stop import stop_after
from ..model.arch import ArchSpec
from ._common import OneForward, prepare_inputs, share_params_clone

BACKEND = "TransformerLens"


def tl_layout(name: str, hook: str) -> str:
    """How TransformerLens lays out the tensor of hook ``hook`` (the hook of whole site
    ``name``), as a layout of :mod:`notekv.hooks.layouts`: ``"swap"`` for the per-head
    activations (``hook_q``/``k``/``v``, ``hook_rot_q``/``rot_k``, ``hook_z``: ``[B, S, H, D]``),
    ``"plain"`` for the rest: the residual stream, the attention maps ``[B, H, S_q, S_k]`` and
    the bridge's QK-normed ``hook_q_normed``/``hook_k_normed`` (``[B, H, S, D]``), which are in
    notekv's layout already. A backend checks this against the bridge when it is built."""
    site_ = Site(name)
    if not site_.head_split or name in ATTN_MAP_SITES or hook.endswith("_normed"):
        return "plain"
    return "swap"


def tl_route(spec: ArchSpec, name: str, layer: int | None) -> Access | Unsupported:
    """The bridge hook of whole site ``name`` of layer ``layer`` (``Access(hook name, "hook",
    layout)``, the layout by :func:`tl_layout`), or why there is none."""
    lay = spec.layout
    if name in CACHE_SITES:
        return Unsupported("it is a cache slot after the update, seen only by the native cache wrapper")
    if name == MASK_SITE:
        return Unsupported("a knockout edits the attention mask notekv's native layer passes to the kernel")
    if name in MOE_SITES:
        return Unsupported("the bridge has no hook for the router's logits or each expert's output (replacing the "
                           "logits must re-route the tokens); notekv's hook layer recomputes them")
    if name in ("attn.q", "attn.k") and lay.positions != "rotary":
        return Unsupported(f"{spec.model_type} has no rotary embedding, so the bridge fires no hook_rot_q/hook_rot_k; "
                           f"there {name} equals {name}_pre (hook_q/hook_k), use that")
    if name == "embed" and lay.embed_multiplier is not None:
        return Unsupported(f"the bridge's hook_embed is after {spec.model_type}'s {lay.embed_multiplier}, notekv's "
                           "embed the embedding module's output before it (L0.resid_pre is after it)")
    if name in ("attn_out", "mlp_out") and lay.residual_multiplier is not None:
        return Unsupported(f"the bridge's hook_{name} is after {spec.model_type}'s {lay.residual_multiplier}, "
                           f"notekv's {name} the module's output before it")
    if name == "logits" and lay.logits_out is not None:
        return Unsupported(f"the bridge's unembed.hook_out is not {spec.model_type}'s logits: the head scales or "
                           "soft-caps the unembedding's output after it (the backend's Run.logits are the model's)")
    if lay.kv_expand and name in ("attn.q", "attn.q_pre", "attn.k", "attn.v"):
        return Unsupported(f"{spec.model_type} uses latent attention: the bridge's q/k/v hooks see its latent "
                           "projections and the rotary key shared by all heads, not per-head queries, keys and values")
    if name in ("attn.q", "attn.k") and lay.qkv_proj is not None:
        return Unsupported(f"the bridge's fused-QKV attention ({spec.model_type}) never fires "
                           "hook_rot_q/hook_rot_k")
    rel = TL_NAME_OF[name]
    if name in ("attn.q_pre", "attn.k_pre") and (lay.q_norm if name == "attn.q_pre" else lay.k_norm):
        rel += "_normed"  # the bridge's hook_q/hook_k sit before the QK-norm
    return Access(rel if layer is None else f"blocks.{layer}.{rel}", "hook", tl_layout(name, rel))


register_executor("tl", tl_route, label="the TransformerLens backend", column="TL", fix="Use model.run for it.")


def _bridge_tokenizer(tokenizer):
    """A copy of the tokenizer the bridge can adopt without reloading it from disk.

    The bridge normalizes the tokenizer in place and, unless ``add_bos_token`` is set in
    its init kwargs, reloads it with ``AutoTokenizer.from_pretrained(name_or_path)``, which
    fails for tokenizers built in memory. notekv always hands the bridge token ids, so the
    bridge's own BOS behaviour never matters.
    """
    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs = {**tok.init_kwargs, "name_or_path": getattr(tok, "name_or_path", "") or "",
                       "add_bos_token": True}
    return tok


class TLBackend:
    """Run notekv sites and interventions through a TransformerLens 4.3 ``TransformerBridge``.

    ``model``: a :class:`~notekv.HookedModel`. ``hf`` is the clone the bridge wraps (weights
    shared with ``model.hf``).

    Escape hatch: ``TLBackend(model).bridge`` is the booted ``TransformerBridge`` itself, for
    TransformerLens code as it is written (``bridge.run_with_hooks``, ``bridge.run_with_cache``,
    ``bridge.hook_dict``); feed it ``model.to_tokens(text)`` so that it reads the tokens notekv
    reads. Its results come back into notekv: an ``ActivationCache`` from
    ``bridge.run_with_cache`` is a :class:`~notekv.Patch` source (each site read under its
    TransformerLens name and converted to notekv's layout), one hook's tensor converts with
    :meth:`to_notekv`, and a :class:`~notekv.Hook` given a TransformerLens name
    (``"blocks.3.attn.hook_z"``) hands its function TransformerLens's layout on every executor.

    >>> tl = TLBackend(model)
    >>> _, cache = tl.bridge.run_with_cache(model.to_tokens(clean))
    >>> model.run(corrupt, interventions=[nk.Patch("L3.attn.z", cache, at=nk.Last())])
    """

    name = BACKEND

    def __init__(self, model, *, label: str | None = None):
        from transformer_lens.model_bridge import TransformerBridge

        self.model = model
        self.spec = model.spec
        if self.spec.layout.kv_expand:
            raise UnsupportedError(
                f"the TransformerLens backend does not run this {self.spec.model_type} model: it uses latent attention, "
                "and the bridge's attention hooks (hook_q/k/v, hook_rot_k, hook_z) carry its latent projections and "
                "head-shared rotary key in shapes that are not per-head activations. Use model.run (notekv's hook "
                "layer) or the nnsight backend for it.")
        self.hf = share_params_clone(model.hf)
        # The bridge picks its adapter from config.architectures, which GGUF and config-built
        # models may lack or misname; the loaded class is the truth.
        self.hf.config.architectures = [type(self.hf).__name__]
        try:
            self.bridge = TransformerBridge.boot_transformers(
                label or model.name, hf_model=self.hf, tokenizer=_bridge_tokenizer(model.tokenizer),
                device=str(model.device),
            )
        except ImportError as err:  # an adapter that needs an optional library (Qwen2.5-VL: torchvision)
            raise UnsupportedError(f"the TransformerLens backend cannot bridge this {self.spec.model_type} model: "
                                   f"{str(err).rstrip('. ')}. Use model.run (notekv's hook layer) for it.") from None
        except RuntimeError as err:  # an adapter that refuses this model (Phi's QK LayerNorm in TL 4.3)
            raise UnsupportedError(f"the TransformerLens backend cannot bridge this {self.spec.model_type} model: "
                                   f"its adapter refuses it ({err}). Use model.run (notekv's hook layer) for it.") from None
        self.hook_names = frozenset(self.bridge.hook_dict)
        self._mismatched: dict[str, tuple[str, str]] = {}
        self._layouts = self._probe()

    def __repr__(self) -> str:
        return f"TLBackend({self.model.name!r})"

    # ------------------------------------------------------------------ sites
    def hook_name(self, s: Site) -> str:
        """The bridge hook of (whole) site ``s``; :class:`UnsupportedError` if the bridge lacks it."""
        name = self.model.sitemap.route(s.whole).access("tl").module
        if self._rel(name) in self._mismatched:
            found, declared = self._mismatched[self._rel(name)]
            raise UnsupportedError(
                f"site {s}: the bridge of this {self.spec.model_type} model lays out {name!r} as {found}, not as "
                f"TransformerLens's usual layout for it ({'[B, S, H, D]' if declared == 'swap' else '[B, H, S, D]'}), "
                f"so it is not supported by the {BACKEND} backend here. Use model.run for it."
            )
        if name not in self.hook_names or self._rel(name) not in self._layouts:
            raise UnsupportedError(
                f"site {s}: the bridge of this {self.spec.model_type} model has no working hook {name!r} "
                f"(absent or never fired), so {s.name} is not supported by the {BACKEND} backend here. "
                "Use model.run for it."
            )
        return name

    def to_notekv(self, s, value: torch.Tensor) -> torch.Tensor:
        """``value``, the tensor of site ``s``'s TransformerLens hook (``bridge.run_with_cache``
        or a hook), in notekv's layout (``[B, S, H, D]`` -> ``[B, H, S, D]`` where
        TransformerLens swaps the axes): a :class:`~notekv.Patch` source or a Run's value."""
        return self.model.sitemap.to_notekv(s, value, "tl")

    def layout(self, hook_name: str) -> str:
        """How the bridge lays out the tensor of ``hook_name``: ``"bshd"`` or ``"bhsd"``
        (head-split sites; attention maps are ``"bhsd"``) or ``"bsd"``."""
        return self._layouts[self._rel(hook_name)]

    @staticmethod
    def _rel(name: str) -> str:
        return name.split(".", 2)[2] if name.startswith("blocks.") else name

    def _probe(self) -> dict[str, str]:
        """One short forward through the first block with attention (block 0 but on a
        hybrid; its length differs from every head count) with every candidate hook of that
        layer attached: which hooks fire, and how each lays out its tensor.

        A hook can sit in ``bridge.hook_dict`` without firing (GPT-NeoX's ``hook_rot_q``);
        such sites are refused rather than silently ignored.
        """
        spec = self.spec
        first = (spec.attention_layers or (0,))[0]
        n = max(spec.n_heads, spec.n_kv_heads) + 2
        names: dict[str, str] = {}
        for site_name in GLOBAL_SITES + LAYER_SITES:
            acc = self.model.sitemap.route(Site(site_name, None if site_name in GLOBAL_SITES else first)).get("tl")
            if isinstance(acc, Access) and acc.module in self.hook_names:
                names[acc.module] = site_name
        shapes: dict[str, tuple] = {}

        def record(name):
            return lambda tensor, hook: shapes.__setitem__(name, tuple(tensor.shape))

        ids = (torch.arange(n) % spec.vocab_size)[None].to(self.model.device)
        # up to that block only: the unembedding never runs, globals are taken as given
        with torch.no_grad(), stop_after(self.bridge.blocks[first]):
            self.bridge.run_with_hooks(ids, fwd_hooks=[(name, record(name)) for name in names])
        for name in ("hook_embed", "unembed.hook_out"):
            if name in names:
                shapes.setdefault(name, ())
        out = {}
        for name, shape in shapes.items():
            site_name = names[name]
            heads = spec.n_kv_heads if Site(site_name).head_kind == "kv" else spec.n_heads
            if not Site(site_name).head_split:
                layout = "bsd"
            elif site_name in ATTN_MAP_SITES:
                layout = "bhsd"
            elif shape[1:3] == (n, heads):
                layout = "bshd"
            elif shape[1:3] == (heads, n):
                layout = "bhsd"
            elif len(shape) == 3:  # heads not split (OLMoE's QK-norm over the whole projection): refused
                self._mismatched[self._rel(name)] = ("[B, S, H * D] (heads not split)", tl_layout(site_name, self._rel(name)))
                continue
            else:
                raise RuntimeError(f"{BACKEND} hook {name} has shape {shape}; cannot map it to notekv's layout")
            declared = tl_layout(site_name, self._rel(name))
            if (layout == "bshd") != (declared == "swap"):  # the site map would convert it wrongly
                self._mismatched[self._rel(name)] = (layout, declared)
                continue
            out[self._rel(name)] = layout
        return out

    # ------------------------------------------------------------------ run
    def _hook_fn(self, applier: OneForward, s: Site):
        self.hook_name(s)  # refuses a hook the bridge lacks
        layout = self.model.sitemap.route(s.whole).access("tl").layout  # checked against the bridge at build

        def fn(tensor, hook):
            new = applier.apply(s, to_site(layout, tensor, self.spec))
            if new is None:
                return None  # in-place edits by a Hook already live in ``tensor``
            return from_site(layout, tensor, new, self.spec)
        return fn

    def run(self, inputs, *, collect=(), interventions: tuple[Intervention, ...] | list = (),
            grad: bool = False) -> Run:
        """One forward through the bridge with notekv interventions; same inputs and Run
        shapes as :meth:`HookedModel.run` (``Run.kv`` is None). ``grad=True``: a forward
        with gradients from the :class:`~notekv.Tap` sites (``run.grads(score)``)."""
        check_grad(grad, interventions, "TLBackend.run")
        ids, view = prepare_inputs(self.model, inputs)
        applier = OneForward("tl", self.model, interventions, collect, view, ids.shape[1])
        hooks = [(self.hook_name(s), self._hook_fn(applier, s)) for s in applier.sites]
        with torch.set_grad_enabled(grad):
            logits = self.bridge.run_with_hooks(ids.to(self.model.device), fwd_hooks=hooks)
        applier.check_fired(BACKEND)
        run = Run(logits=logits, acts=applier.acts(), kv=None, ids=ids, view=view)
        run.taps = dict(applier.taps)
        run.sitemap = self.model.sitemap
        return run
