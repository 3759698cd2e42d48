"""What the optional backends share: input handling, a parameter-sharing model clone, and
the intervention semantics (Collect / Patch / Ablate / Steer / Hook) on one site's tensor.

The semantics follow :class:`notekv.hooks.layer.HookLayer` for a single forward with no
past (slots ``0 .. S-1``, step 0) but are written out here independently, so the parity
tests check the native hook layer as much as the backends. Every tensor handled here is in
notekv's layout for the site (``[B, H, S, D]`` head-split, ``[B, S, d]`` residual,
``[B, H, Sq, Sk]`` attention maps); the backends convert to and from their library's layout.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..hooks.interventions import Ablate, Collect, Hook, Intervention, Knockout, KVPatch, Patch, Steer
from ..hooks.layer import HookContext
from ..hooks.positions import TokenView, resolve
from ..hooks.sites import Site, site as parse_site

Handler = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]


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
    """``(ids [B, S], view)`` from text, equal-length texts, a TokenView or ids.

    Text goes through ``model.tokenize`` (BOS as the native backend adds it), so positions
    resolve against the same :class:`TokenView` as in ``model.run``.
    """
    if isinstance(inputs, TokenView):
        return torch.tensor([inputs.ids]), inputs
    if isinstance(inputs, str):
        view = model.tokenize(inputs)
        return torch.tensor([view.ids]), view
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        return ids.long(), None
    if isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], str):
        views = [model.tokenize(t) for t in inputs]
        if len({len(v) for v in views}) != 1:
            raise ValueError(
                f"batched prompts tokenize to different lengths {sorted({len(v) for v in views})}; "
                "pass prompts of equal token length (or run them one by one)"
            )
        return torch.tensor([v.ids for v in views]), views[0]
    raise TypeError(f"inputs must be str, list[str], TokenView or ids, not {type(inputs).__name__}")


def _source(source, s: Site) -> torch.Tensor:
    from ..hooks.run import Run

    if isinstance(source, Run):
        key = str(s.whole)
        if key not in source.acts:
            raise KeyError(f"the source Run has no activation for {key}; collect it first (collect=[{key!r}])")
        return source.acts[key]
    if isinstance(source, torch.Tensor):
        return source
    raise TypeError(f"source must be a Run or a tensor, not {type(source).__name__}")


def _select(t: torch.Tensor, dim: int, idx: torch.Tensor, head: int | None) -> tuple:
    sl: list = [slice(None)] * t.dim()
    sl[dim] = idx.to(t.device)
    if head is not None:
        sl[1] = head
    return tuple(sl)


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
        s = iv.site
        if isinstance(iv, Collect):
            def collect(t, ctx):
                x = t.detach()
                if iv.at is not None:
                    x = x.index_select(s.pos_dim, self._local(self._slots(iv.at)).to(x.device))
                if s.head is not None:
                    x = x[:, s.head]
                self.collected[str(s)] = x.clone()
            return collect

        if isinstance(iv, Patch):
            def patch(t, ctx):
                slots = self._slots(iv.at)
                local = self._local(slots)
                if len(local) == 0:
                    return None
                src = _source(iv.source, s)
                if s.head is not None and src.dim() == t.dim() - 1:
                    src = src.unsqueeze(1)
                dim = s.pos_dim
                present = [int(i) for i in local]  # slot == local index: one forward, no past
                if isinstance(iv.source, torch.Tensor) and slots is not None and src.shape[dim] == len(slots):
                    pick = [slots.index(p) for p in present]
                else:
                    if max(present) >= src.shape[dim]:
                        raise IndexError(f"{s}: the source covers slots 0..{src.shape[dim] - 1} but slot "
                                         f"{max(present)} was requested")
                    pick = present
                vals = src.index_select(dim, torch.tensor(pick, device=src.device))
                if s.head is not None and vals.shape[1] != 1:
                    vals = vals[:, s.head : s.head + 1]
                out = t.clone()
                idx = _select(out, dim, local, None)
                if s.head is not None:
                    sub = out[idx]
                    sub[:, s.head : s.head + 1] = vals.to(out)
                    out[idx] = sub
                else:
                    out[idx] = vals.to(out).expand_as(out[idx])
                return out
            return patch

        if isinstance(iv, Ablate):
            gen = torch.Generator().manual_seed(iv.seed)

            def ablate(t, ctx):
                local = self._local(self._slots(iv.at))
                if len(local) == 0:
                    return None
                out = t.clone()
                idx = _select(out, s.pos_dim, local, s.head)
                if iv.kind == "zero":
                    out[idx] = 0
                elif iv.kind == "mean":
                    ref = _source(iv.reference, s) if iv.reference is not None else t
                    m = ref.mean(dim=(0, s.pos_dim), keepdim=True)
                    if s.head is not None:
                        m = m[:, s.head]
                    out[idx] = m.to(out).expand_as(out[idx])
                else:
                    ref = _source(iv.reference, s)
                    row = int(torch.randint(ref.shape[0], (1,), generator=gen))
                    vals = ref[row : row + 1].index_select(s.pos_dim, local.to(ref.device))
                    if s.head is not None:
                        vals = vals[:, s.head]
                    out[idx] = vals.to(out).expand_as(out[idx])
                return out
            return ablate

        if isinstance(iv, Steer):
            def steer(t, ctx):
                local = self._local(self._slots(iv.at))
                if len(local) == 0:
                    return None
                out = t.clone()
                idx = _select(out, s.pos_dim, local, s.head)
                vec = iv.vector.to(out)
                if s.head_split and s.head is None and vec.dim() == 2:
                    vec = vec[:, None, :]
                out[idx] = out[idx] + iv.scale * vec
                return out
            return steer

        return lambda t, ctx: iv.fn(t, hook=ctx)  # Hook

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
