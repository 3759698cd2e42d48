"""Mixture-of-experts sites and the expert knockout.

Two sites per routed block (grammar in :mod:`notekv.hooks.sites`)::

    L{l}.moe.router    [B, S, n_experts]           the router's logits, before softmax / top-k
    L{l}.moe.experts   [B, S, n_experts, d_model]  each expert's weighted output (its routing
                                                   weight included), 0 where the token is not
                                                   routed to it

The sum of ``moe.experts`` over the expert axis is the experts module's output; ``mlp_out``
adds any shared expert (Qwen2-MoE's sigmoid-gated one), and, where the family has one, its
output norm. Replacing ``moe.router`` re-routes: the routing weights and the chosen experts
are recomputed from the new logits by the family's routing rule (:data:`ROUTINGS`, named by
``FamilyLayout.routing``), exactly as the model's router computes them from its own logits.
Replacing ``moe.experts`` replaces the block's routed output by the sum of the new values.

Where the blocks live is family data: ``FamilyLayout.router`` / ``.experts`` (paths in one
decoder layer) and ``ArchSpec.moe_layers`` (layers with a routed block; Qwen-MoE's
``mlp_only_layers`` are dense). Only notekv's hook layer reaches these sites (the forward
hooks here); the TransformerLens and nnsight backends refuse them.

Cost: collecting ``moe.experts`` runs the experts once more on the routed (token, expert)
pairs and holds a ``[B, S, n_experts, d_model]`` tensor; ``moe.router`` is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from ..model.arch import ArchSpec
from .interventions import Collect, Intervention, _at, _layers
from .plan import HookContext
from .positions import Selector
from .sitemap import Access, Unsupported
from .sites import MOE_SITES, Site, SiteError


# ---------------------------------------------------------------------- routing rules
def _softmax_topk(router: nn.Module, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-MoE / OLMoE: softmax over every expert in fp32, top-k, renormalized when the
    router's ``norm_topk_prob`` is set, weights in the logits' dtype."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top, idx = torch.topk(probs, k, dim=-1)
    if getattr(router, "norm_topk_prob", False):
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), idx


def _softmax_topk_fp32(router: nn.Module, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral: softmax over every expert in fp32, top-k, always renormalized, weights kept fp32."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), idx


def _topk_softmax(router: nn.Module, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: top-k of the (biased) logits, softmax over those k."""
    top, idx = torch.topk(logits, k, dim=-1)
    return torch.softmax(top, dim=1, dtype=top.dtype), idx


def _deepseek_v2(router: nn.Module, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax in fp32, top-k over every expert (``topk_method="greedy"``) or over
    the best ``topk_group`` groups (``"group_limited_greedy"``), times ``routed_scaling_factor``."""
    scores = logits.float().softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        e, g = router.num_experts, router.num_group
        groups = scores.view(-1, g, e // g).max(dim=-1).values
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, k=router.topk_group, dim=-1, sorted=False)[1], 1)
        scores = scores.masked_fill(~keep.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e).bool(), 0.0)
    top, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    return top * router.routed_scaling_factor, idx


def _deepseek_v3(router: nn.Module, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; experts chosen by score + ``e_score_correction_bias`` within
    the ``topk_group`` groups whose two best biased scores sum highest; weights the unbiased
    scores, renormalized when ``norm_topk_prob``, times ``routed_scaling_factor``."""
    scores = logits.float().sigmoid()
    choice = scores + router.e_score_correction_bias
    e, g = router.num_experts, router.num_group
    groups = choice.view(-1, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, k=router.topk_group, dim=-1, sorted=False)[1], 1)
    choice = choice.masked_fill(~keep.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e).bool(), float("-inf"))
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    top = scores.gather(1, idx)
    if router.norm_topk_prob:
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    return top * router.routed_scaling_factor, idx


#: ``FamilyLayout.routing`` -> ``rule(router, logits [T, E], k) -> (weights [T, k], indices [T, k])``.
ROUTINGS: dict[str, Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax_topk": _softmax_topk,
    "softmax_topk_fp32": _softmax_topk_fp32,
    "topk_softmax": _topk_softmax,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
}


def route(spec: ArchSpec, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and expert indices ``[T, k]`` from router logits ``[T, E]`` by the
    family's rule (what the router module returns beside its logits)."""
    rule = ROUTINGS.get(spec.layout.routing)
    if rule is None:
        from .sitemap import UnsupportedError

        raise UnsupportedError(f"{spec.model_type}: routing rule {spec.layout.routing!r} is not one notekv knows "
                               f"({sorted(ROUTINGS)}); add it to notekv.hooks.moe.ROUTINGS")
    return rule(router, logits, spec.experts_per_token)


# ---------------------------------------------------------------------- per-expert outputs
def expert_contributions(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                         n_experts: int) -> torch.Tensor:
    """``[T, E, d]``: each expert's weighted output per token (0 where not routed), from the
    experts module's own forward run once on every routed (token, expert) pair. ``hidden``
    ``[T, d]``, ``indices`` / ``weights`` ``[T, k]`` as the module receives them."""
    t, k = indices.shape
    pairs = experts.forward(hidden.repeat_interleave(k, dim=0), indices.reshape(-1, 1), weights.reshape(-1, 1))
    out = pairs.new_zeros(t, n_experts, hidden.shape[-1])
    out[torch.arange(t, device=indices.device).repeat_interleave(k), indices.reshape(-1)] = pairs
    return out


def combine(contributions: torch.Tensor) -> torch.Tensor:
    """The experts module's output ``[..., d]`` from per-expert contributions ``[..., E, d]``,
    added in expert order."""
    out = torch.zeros_like(contributions[..., 0, :])
    for e in range(contributions.shape[-2]):
        out = out + contributions[..., e, :]
    return out


# ---------------------------------------------------------------------- the native routes and hooks
def absent(spec: ArchSpec, layer: int | None) -> str | None:
    """Why ``spec``'s layer ``layer`` has no ``moe.*`` site (for every executor), or None."""
    if spec.layout.router is None or spec.layout.experts is None:
        return (f"{spec.model_type} has a dense MLP, no mixture-of-experts router (moe.* sites exist on the "
                "families whose FamilyLayout names a router and experts)")
    if spec.moe_layers is not None and layer is not None and layer not in spec.moe_layers:
        return (f"layer {layer} of this {spec.model_type} model is a dense MLP (no router); its "
                f"mixture-of-experts layers are {list(spec.moe_layers)}")
    return None


def native_access(spec: ArchSpec, name: str, layer: int | None) -> Access | Unsupported:
    """Where the hook layer reads ``moe.router`` (the router's output) / ``moe.experts`` (the
    experts module's call)."""
    why = absent(spec, layer)
    if why is not None:
        return Unsupported(why)
    lay = spec.layout
    path = lay.router if name == "moe.router" else lay.experts
    return Access(f"{lay.layers}.{layer}.{path}", "router" if name == "moe.router" else "experts")


def _read_only(executor, site: Site) -> bool:
    return all(isinstance(step.owner, Collect) for step in executor.plan.at(site))


def _router_hook(executor, site: Site):
    spec = executor.spec
    read_only = _read_only(executor, site)

    def hook(module, args, output):
        if executor.suspended():
            return None
        logits = output[0]
        t, e = logits.shape
        s = len(executor.slots)
        new = executor.dispatch(site, logits.view(t // s, s, e))
        if read_only:
            return None
        flat = new.reshape(t, e).to(logits.dtype)
        weights, indices = route(spec, module, flat)
        return (flat, weights, indices) + tuple(output[3:])
    return hook


def _experts_hook(executor, site: Site):
    spec = executor.spec
    read_only = _read_only(executor, site)

    def hook(module, args, kwargs, output):
        if executor.suspended():
            return None
        values = list(args) + list(kwargs.values())
        if len(values) != 3:
            from .sitemap import UnsupportedError

            raise UnsupportedError(f"site {site}: the {spec.model_type} experts module was called with "
                                   f"{len(values)} arguments, not (hidden, indices, weights); notekv cannot split "
                                   "its output by expert")
        hidden, indices, weights = values
        contrib = expert_contributions(module, hidden, indices, weights, spec.n_experts)
        t, s = hidden.shape[0], len(executor.slots)
        new = executor.dispatch(site, contrib.view(t // s, s, *contrib.shape[1:]))
        if read_only:
            return None
        return combine(new.reshape(contrib.shape)).to(output.dtype)
    return hook


def register(executor, site: Site, acc: Access):
    """A forward hook for ``site`` on the module of ``acc`` (kind ``router`` or ``experts``);
    returns its handle. The hook hands the plan notekv's layout and, when the plan may write,
    returns the module's output recomputed from what the plan left (re-routed logits; the
    sum of the expert contributions)."""
    from ..model.arch import get_submodule

    module = get_submodule(executor.hf, acc.module)
    if acc.kind == "router":
        return module.register_forward_hook(_router_hook(executor, site))
    return module.register_forward_hook(_experts_hook(executor, site), with_kwargs=True)


# ---------------------------------------------------------------------- the intervention
class ExpertKnockoutError(InputError):
    """An expert knockout that leaves the router fewer experts than it picks per token."""


def _ints(xs, what: str) -> tuple[int, ...]:
    if isinstance(xs, int):
        return (xs,)
    try:
        return tuple(int(x) for x in xs)
    except (TypeError, ValueError):
        raise InputError(f"{what}={xs!r}: give an int or a list of ints") from None


@dataclass(frozen=True)
class ExpertKnockout(Intervention):
    """Remove ``experts`` from the routing of the tokens at ``at`` (every token by default) in
    ``layers`` (an int, a list, or "all" mixture-of-experts layers).

    Their router logits become -inf before the routing rule runs, so each affected token goes
    to its next-best experts and the softmax renormalizes over the experts left: for those
    tokens the router behaves as if the knocked-out experts did not exist. (On a router whose
    weights are not renormalized after top-k, Qwen2-MoE or OLMoE, the remaining weights thus
    grow; this is the router without those experts, not the same weights re-used.) At least
    ``experts_per_token`` experts must remain. Native hook layer only (site ``moe.router``).

    >>> model.run(text, interventions=[nk.ExpertKnockout(1, experts=[0, 3], at=nk.Last())])
    """

    layers: tuple[int, ...] | str
    experts: tuple[int, ...]
    at: Selector | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "experts", _ints(self.experts, "experts"))
        object.__setattr__(self, "at", _at(self.at))
        if not self.experts:
            raise InputError("ExpertKnockout: experts is empty; name at least one expert to knock out")

    def compile(self, model):
        spec = model.spec
        layers = list(spec.moe_layers or ()) if self.layers == "all" else list(self.layers)
        if self.layers == "all" and not layers:
            raise SiteError(f"ExpertKnockout: {absent(spec, None) or 'this model has no routed layers'}")
        n, k = spec.n_experts, spec.experts_per_token
        if n:
            bad = [e for e in self.experts if not 0 <= e < n]
            if bad:
                raise SiteError(f"ExpertKnockout: expert {bad[0]} out of range, the {spec.model_type} model has "
                                f"{n} experts per block (0..{n - 1})")
            if n - len(set(self.experts)) < k:
                raise ExpertKnockoutError(
                    f"ExpertKnockout: knocking out {len(set(self.experts))} of {n} experts leaves fewer than the "
                    f"{k} the router picks per token; keep at least {k}")
        cols = torch.tensor(sorted(set(self.experts)))

        def op(t, ctx: HookContext):
            cells = ctx.cells(self, self.at)
            if not len(cells):
                return None
            out = t.clone()
            rows, local = cells.rows.to(t.device), cells.local.to(t.device)
            out[rows[:, None], local[:, None], cols.to(t.device)[None, :]] = float("-inf")
            return out
        return [(Site("moe.router", l), op) for l in layers]


__all__ = ["ExpertKnockout", "ExpertKnockoutError", "MOE_SITES", "ROUTINGS", "combine", "expert_contributions",
           "route"]
