"""What the optional backends share: input handling, a parameter-sharing model clone, and
the intervention semantics (Collect / Patch / Ablate / Steer / Hook) on one site's tensor.

The intervention semantics are the hook layer's own (:mod:`notekv.hooks.apply`), applied for
a single forward with no past (slots ``0 .. S-1``, step 0); the parity tests check each
backend's site plumbing (where a site is read, its layout) against the native one. Every tensor handled here is in
notekv's layout for the site (``[B, H, S, D]`` head-split, ``[B, S, d]`` residual,
``[B, H, Sq, Sk]`` attention maps); the backends convert to and from their library's layout.
A :class:`~notekv.Hook` function receives a :class:`~notekv.HookContext` whose ``slots``,
``step`` and ``local()`` behave as natively; its ``hook_layer`` is the backend's
:class:`Applier`, not a HookLayer.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..hooks.apply import HookContext, Handler, make_handler
from ..hooks.interventions import Ablate, Collect, Hook, Intervention, Knockout, KVPatch, Patch, Steer
from ..hooks.positions import TokenView, resolve
from ..hooks.sites import Site, site as parse_site



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


class Applier:
    """Compiles interventions for one forward of ``n_tokens`` tokens and applies them per site.

    ``backend`` names the library in error messages. ``supported(site)`` is called for
    every requested site and must raise NotImplementedError for one the backend lacks.
    """

    def __init__(self, backend: str, spec, interventions: Sequence[Intervention], collect: Iterable,
                 view: TokenView | None, n_tokens: int, supported: Callable[[Site], None]):
        self.backend = backend
        self.view = view
        self.n = n_tokens
        self.slots = torch.arange(n_tokens)
        self.step = 0
        self.collected: dict[str, torch.Tensor] = {}
        self.collect_keys: list[str] = []
        self.handlers: dict[Site, list[Handler]] = defaultdict(list)
        self.fired: set[Site] = set()
        collectors = [Collect(parse_site(s)) for s in collect]
        for iv in tuple(interventions) + tuple(collectors):
            if isinstance(iv, (Knockout, KVPatch)):
                raise NotImplementedError(
                    f"{type(iv).__name__} is not supported by the {backend} backend (it needs notekv's "
                    "attention function / cache wrapper); run it with the native backend, model.run(...)"
                )
            if not isinstance(iv, (Collect, Patch, Ablate, Steer, Hook)):
                raise NotImplementedError(f"{type(iv).__name__} is not supported by the {backend} backend")
            s = iv.site
            s.check(spec.n_layers, spec.n_heads, spec.n_kv_heads)
            supported(s)
            self.handlers[s.whole].append(self._handler(iv))
        self.collect_keys = [str(c.site) for c in collectors]

    # ------------------------------------------------------------ positions
    def _slots(self, at) -> list[int] | None:
        if self.view is not None:
            return resolve(at, self.view)
        return resolve(at, None, n_tokens=self.n)

    def _local(self, slots: list[int] | None) -> torch.Tensor:
        if slots is None:
            return torch.arange(self.n)
        return torch.tensor([s for s in slots if 0 <= s < self.n], dtype=torch.long)

    # ------------------------------------------------------------ handlers
    def _handler(self, iv: Intervention) -> Handler:
        return make_handler(iv, lambda owner, at, tag="": self._slots(at),
                            lambda key, x: self.collected.__setitem__(key, x))

    # ------------------------------------------------------------ dispatch
    @property
    def sites(self) -> list[Site]:
        """Whole sites (head axis kept) that need a hook."""
        return list(self.handlers)

    def apply(self, s: Site, t: torch.Tensor) -> torch.Tensor | None:
        """Run the handlers of whole site ``s`` on ``t`` (notekv layout).

        Returns the replacement tensor, or None when nothing replaced it (in-place edits by a
        :class:`Hook` then live in ``t``).
        """
        self.fired.add(s)
        ctx = HookContext(s, self.slots, self.step, self)  # type: ignore[arg-type]
        changed = None
        for handler in self.handlers.get(s, ()):
            new = handler(t, ctx)
            if new is not None:
                if new.shape != t.shape:
                    raise ValueError(f"hook at {s} returned shape {tuple(new.shape)}, expected {tuple(t.shape)}")
                t = changed = new
        return changed

    def check_fired(self) -> None:
        """Raise if a site with interventions was never reached in the forward."""
        missing = [str(s) for s in self.handlers if s not in self.fired]
        if missing:
            raise RuntimeError(f"the {self.backend} backend never reached the sites {missing}; "
                               "their interventions did not run")

    def acts(self) -> dict[str, torch.Tensor]:
        return {k: self.collected[k] for k in self.collect_keys}
