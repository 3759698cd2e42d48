"""Intervention semantics on one site's tensor: Collect, Patch, Ablate, Steer and Hook.

The HookLayer and the optional backends share these handlers; each supplies how selectors
resolve to slots (``slots_of``) and where collected tensors go (``sink``). Tensors are in
notekv's layout for the site (``[B, H, S, D]`` head-split, ``[B, S, d]`` residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .interventions import Ablate, Collect, Hook, Intervention, Patch, Steer
from .sites import Site


@dataclass
class HookContext:
    """What a hook function learns about the activation it receives.

    ``slots``: absolute slot of each index along the site's position axis; ``step``: index
    of this forward in the context (0 = prefill); ``layer``: the site's layer.
    """

    site: Site
    slots: torch.Tensor
    step: int
    hook_layer: Any

    @property
    def layer(self) -> int | None:
        return self.site.layer

    def local(self, slots: list[int] | None) -> torch.Tensor:
        """Indices along the position axis of the given absolute slots that are present here."""
        if slots is None:
            return torch.arange(len(self.slots))
        first = int(self.slots[0]) if len(self.slots) else 0
        n = len(self.slots)
        return torch.tensor([s - first for s in slots if first <= s < first + n], dtype=torch.long)


Handler = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]
SlotsOf = Callable[..., "list[int] | None"]  # slots_of(owner, at, tag="") -> absolute slots or None (all)
Sink = Callable[[str, torch.Tensor], None]


def make_handler(iv: Intervention, slots_of: SlotsOf, sink: Sink) -> Handler:
    """The function ``(tensor, ctx) -> tensor | None`` that applies ``iv`` at its site."""
    if isinstance(iv, Collect):
        return _collect(iv, slots_of, sink)
    if isinstance(iv, Patch):
        return _patch(iv, slots_of)
    if isinstance(iv, Ablate):
        return _ablate(iv, slots_of)
    if isinstance(iv, Steer):
        return _steer(iv, slots_of)
    if isinstance(iv, Hook):
        return lambda t, ctx: iv.fn(t, hook=ctx)
    raise TypeError(f"{type(iv).__name__} cannot be applied at a site")


def pos_index(t: torch.Tensor, dim: int, idx: torch.Tensor, head: int | None):
    """An index tuple selecting ``idx`` along ``dim`` (and one head along dim 1)."""
    sl: list = [slice(None)] * t.dim()
    sl[dim] = idx.to(t.device)
    if head is not None:
        sl[1] = head
    return tuple(sl)


def source_tensor(source, site: Site) -> torch.Tensor:
    from .run import Run

    if isinstance(source, Run):
        key = str(site.whole)
        if key not in source.acts:
            raise KeyError(
                f"the source Run has no activation for {key}; collect it first: "
                f"model.run(prompt, collect=[{key!r}])"
            )
        return source.acts[key]
    if isinstance(source, torch.Tensor):
        return source
    raise TypeError(f"source must be a Run or a tensor, not {type(source).__name__}")


def take(src: torch.Tensor, dim: int, slots: list[int], site: Site) -> torch.Tensor:
    n = src.shape[dim]
    bad = [s for s in slots if s >= n]
    if bad:
        raise IndexError(
            f"{site}: the source covers slots 0..{n - 1} but slot {bad[0]} was requested; "
            "patch from a source prompt at least as long as the target"
        )
    return src.index_select(dim, torch.tensor(slots, device=src.device))


def _collect(iv: Collect, slots_of: SlotsOf, sink: Sink) -> Handler:
    def fn(t, ctx):
        x = t.detach()
        if iv.at is not None:
            x = x[pos_index(x, iv.site.pos_dim, ctx.local(slots_of(iv, iv.at)), None)]
        if iv.site.head is not None:
            x = x[:, iv.site.head]
        sink(str(iv.site), x.clone())
    return fn

def _patch(iv: Patch, slots_of: SlotsOf) -> Handler:
    def fn(t, ctx):
        s = iv.site
        src = source_tensor(iv.source, s.whole)
        slots = slots_of(iv, iv.at)
        local = ctx.local(slots)
        if len(local) == 0:
            return None
        present = [int(ctx.slots[i]) for i in local]
        if s.head is not None and src.dim() == t.dim() - 1:
            src = src.unsqueeze(1)
        dim = s.pos_dim
        explicit = isinstance(iv.source, torch.Tensor) and slots is not None and src.shape[dim] == len(slots)
        if explicit:
            vals = src.index_select(dim, torch.tensor([slots.index(p) for p in present], device=src.device))
        else:
            vals = take(src, dim, present, s)
        if s.head is not None and vals.shape[1] != 1:
            vals = vals[:, s.head : s.head + 1]
        out = t.clone()
        idx = pos_index(out, dim, local, None)
        if s.head is not None:
            sub = out[idx]
            sub[:, s.head : s.head + 1] = vals.to(out)
            out[idx] = sub
        else:
            out[idx] = vals.to(out).expand_as(out[idx])
        return out
    return fn

def _ablate(iv: Ablate, slots_of: SlotsOf) -> Handler:
    gen = torch.Generator().manual_seed(iv.seed)

    def fn(t, ctx):
        s = iv.site
        local = ctx.local(slots_of(iv, iv.at))
        if len(local) == 0:
            return None
        out = t.clone()
        idx = pos_index(out, s.pos_dim, local, s.head)
        if iv.kind == "zero":
            out[idx] = 0
        elif iv.kind == "mean":
            ref = source_tensor(iv.reference, s.whole) if iv.reference is not None else t
            m = ref.mean(dim=(0, s.pos_dim), keepdim=True)
            if s.head is not None:
                m = m[:, s.head]
            out[idx] = m.to(out).expand_as(out[idx])
        else:
            ref = source_tensor(iv.reference, s.whole)
            row = int(torch.randint(ref.shape[0], (1,), generator=gen))
            present = [int(ctx.slots[i]) for i in local]
            vals = take(ref[row : row + 1], s.pos_dim, present, s)
            if s.head is not None:
                vals = vals[:, s.head]
            out[idx] = vals.to(out).expand_as(out[idx])
        return out
    return fn

def _steer(iv: Steer, slots_of: SlotsOf) -> Handler:
    def fn(t, ctx):
        local = ctx.local(slots_of(iv, iv.at))
        if len(local) == 0:
            return None
        out = t.clone()
        idx = pos_index(out, iv.site.pos_dim, local, iv.site.head)
        vec = iv.vector.to(out)
        if iv.site.head_split and iv.site.head is None and vec.dim() == 2:
            vec = vec[:, None, :]  # [H, D] -> [H, 1, D] against [B, H, S, D]
        out[idx] = out[idx] + iv.scale * vec
        return out
    return fn

