"""What the optional backends share: input handling, a parameter-sharing model clone, and
the one-forward executor of a plan.

A backend compiles the same :class:`~notekv.hooks.plan.Plan` the native hook layer runs
(``compile_plan(model, interventions, executor="tl" | "nnsight")``: an intervention or site the
backend cannot reach raises :class:`~notekv.hooks.sitemap.UnsupportedError`, a
``NotImplementedError``, naming both), looks up each site's route
in the model's site map, and calls :meth:`OneForward.apply` with the activation in notekv's
layout (``[B, H, S, D]`` head-split, ``[B, S, d]`` residual, ``[B, H, Sq, Sk]`` attention maps).
The operations are the interventions' own, so a backend contains only its library's
plumbing. A :class:`~notekv.Hook` function receives a :class:`~notekv.HookContext` whose
``slots``, ``step`` and ``local()`` behave as natively; its ``hook_layer`` is the backend's
:class:`OneForward`, not a HookLayer. A :class:`~notekv.Tap` records its handle in
:attr:`OneForward.taps` as natively, so ``grad=True`` forwards give ``run.grads``.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from ..hooks.interventions import Collect, Intervention
from ..hooks.plan import Executor
from ..hooks.positions import TokenView
from ..hooks.sites import Site


def share_params_clone(hf: nn.Module) -> nn.Module:
    """A copy of ``hf``'s module tree and config whose parameters and buffers *are* ``hf``'s.

    Libraries that rewire a model in place (TransformerLens switches the attention
    implementation, nnsight instruments ``forward`` and adds a ``generator`` submodule) get
    the clone, so the native backend is untouched; the weights are shared, not copied, so
    the clone costs no memory and sees later in-place weight edits.
    """
    memo = {id(t): t for t in list(hf.parameters()) + list(hf.buffers())}
    return copy.deepcopy(hf, memo)


def prepare_inputs(model, inputs) -> tuple[torch.Tensor, TokenView | None]:
    """``(ids [B, S], view)`` exactly as ``model.run`` reads its inputs (BOS included)."""
    return model.encode(inputs)


class OneForward(Executor):
    """The plan of one forward of ``n_tokens`` tokens (no past: slots ``0 .. n-1``, step 0)
    for backend ``executor`` (``"tl"`` or ``"nnsight"``)."""

    def __init__(self, executor: str, model, interventions: Sequence[Intervention], collect: Iterable,
                 view: TokenView | None, n_tokens: int):
        self.executor = executor
        collectors = [Collect(s) for s in model.sitemap.expand(collect)] if collect else []
        super().__init__(model, tuple(interventions) + tuple(collectors), view, horizon=n_tokens)
        self.slots = torch.arange(n_tokens)
        self.step = 0
        self.fired: set[Site] = set()
        self.collect_keys = list(dict.fromkeys(iv.collects for iv in self.interventions if iv.collects))

    @property
    def sites(self) -> list[Site]:
        """Whole sites (head axis kept) that need a hook."""
        return self.plan.sites

    def route(self, s: Site):
        """The backend's access to whole site ``s`` (checked at compile time)."""
        return self.plan.at(s)[0].route.access(self.executor)

    def apply(self, s: Site, t: torch.Tensor) -> torch.Tensor | None:
        """Run the plan at whole site ``s`` on ``t`` (notekv layout); the replacement tensor,
        or None when nothing replaced it (in-place edits by a :class:`Hook` then live in ``t``)."""
        self.fired.add(s)
        new = self.dispatch(s, t)
        return None if new is t else new

    def check_fired(self, backend: str) -> None:
        """Raise if a site with interventions was never reached in the forward."""
        missing = [str(s) for s in self.plan.sites if s not in self.fired]
        if missing:
            raise RuntimeError(f"the {backend} backend never reached the sites {missing}; "
                               "their interventions did not run")

    def acts(self) -> dict[str, torch.Tensor]:
        return {k: self.collected[k][-1] for k in self.collect_keys if self.collected[k]}
