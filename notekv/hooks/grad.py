"""Gradients through the plan: :class:`Tap` makes a site differentiable, :class:`GradGate`
stops the gradient through chosen layers' block outputs (GradDrop).

Both are interventions like any other: they compile to plan steps, and every executor that
reaches their site runs them (the native hook layer, and the TransformerLens and nnsight
backends, whose ``run`` takes ``grad=True`` too; where an executor cannot reach a site it
refuses it, as for any intervention). A tapped forward runs with ``model.run(...,
grad=True)`` (or ``backend.run(..., grad=True)``); the Run it returns gives
``run.grads(score)``: ``d score / d activation`` at every tapped site, in the site's layout.
A Tap in a forward without gradients, or ``grad=True`` without a Tap, is a :class:`GradError`.
The model's weights keep ``requires_grad=False``: the graph starts at the taps, so a forward
costs only what the tapped part of the model needs, and nothing persists after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .interventions import Intervention
from .plan import HookContext
from .sites import Site, site


class GradError(InputError):
    """A gradient asked for where none can flow (no taps, no ``grad=True``, a used-up graph)."""


def check_grad(grad, interventions, where: str) -> None:
    """Refuse a forward whose ``grad`` flag and :class:`Tap` s disagree, before it runs:
    ``grad`` must be a bool, ``grad=True`` needs a Tap, a Tap needs ``grad=True``.
    ``where`` names the call in the message (``"TLBackend.run"``)."""
    if not isinstance(grad, bool):
        raise GradError(f"{where}: grad={grad!r}; pass True (a forward with gradients from Tap sites) or False")
    taps = [iv for iv in interventions if isinstance(iv, Tap)]
    if grad and not taps:
        raise GradError(f"{where}: grad=True needs at least one nk.Tap(site) among interventions: gradients are "
                        "taken at tapped sites")
    if taps and not grad:
        raise GradError(f"{where}: Tap({taps[0].site}) needs a forward with gradients; pass grad=True")


@dataclass(frozen=True)
class Tap(Intervention):
    """Record the activation at ``site`` (kept in ``run.acts`` like :class:`Collect`) and add
    a zero tensor that requires grad to it, so that ``run.grads(score)[site]`` is the
    gradient of ``score`` with respect to the whole activation (every row and position).
    Needs a forward with gradients: ``model.run(..., grad=True)``."""

    site: Site

    def __post_init__(self):
        s = site(self.site)
        if s.head is not None:
            raise GradError(f"Tap({s}): tap the whole site {s.whole} (the gradient keeps the head axis); "
                            "index the head you need")
        object.__setattr__(self, "site", s)

    @property
    def collects(self) -> str:
        return str(self.site)

    def compile(self, model):
        s, key = self.site, str(self.site)

        def op(t, ctx: HookContext):
            if not torch.is_grad_enabled():
                raise GradError(f"Tap at {s}: this forward runs without gradients; use model.run(..., grad=True)")
            delta = torch.zeros_like(t, requires_grad=True)
            ctx.hook_layer.sink(key, t.detach().clone())
            ctx.hook_layer.taps[key] = delta
            return t + delta
        return [(s, op)]


class DropSwitch:
    """Which layer's block outputs stop the gradient in the next backward pass (None: none)."""

    def __init__(self):
        self.layer: int | None = None


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, switch, layer):
        ctx.switch, ctx.layer = switch, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (torch.zeros_like(g) if ctx.switch.layer == ctx.layer else g), None, None


@dataclass(frozen=True)
class GradGate(Intervention):
    """At ``site`` (a block output: ``L{l}.attn_out`` or ``L{l}.mlp_out``) the forward value
    passes unchanged; in a backward pass while ``switch.layer == l`` no gradient flows back
    through it into the block. Holds a live switch, so it does not serialize."""

    site: Site
    switch: DropSwitch

    def __post_init__(self):
        s = site(self.site)
        if s.layer is None or s.name not in ("attn_out", "mlp_out"):
            raise GradError(f"GradGate({s}): gate a block output, L{{l}}.attn_out or L{{l}}.mlp_out")
        object.__setattr__(self, "site", s)

    def compile(self, model):
        s, layer = self.site, self.site.layer

        def op(t, ctx: HookContext):
            return _Gate.apply(t, self.switch, layer) if torch.is_grad_enabled() else None
        return [(s, op)]
