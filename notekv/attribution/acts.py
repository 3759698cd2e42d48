"""Activation attribution (AtP): every (layer, position[, head]) cell of a site at once.

Patching NEW's activation ``x_new`` into the OLD forward at one cell changes the decision
score by about ``grad . (x_new - x_old)``, the gradient taken on the OLD forward. One OLD
forward with gradient taps, one NEW forward and one backward pass give every cell of every
requested site.

GradDrop (Kramar et al. 2024) guards against cancellation between a cell's direct and
indirect paths: for each layer ``l`` the backward pass is repeated with no gradient flowing
back through layer ``l``'s attention and MLP outputs, and the estimate is
``sum_l |AtP_l| / (L - 1)`` (unsigned: a score for ranking cells, not a signed effect).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..hooks.grad import DropSwitch, GradGate, Tap
from ..hooks.sites import RESIDUAL_SITES
from ..sweep import Sweep, _ids_of, answer_ids

SITES = RESIDUAL_SITES + ("attn.z", "attn.q", "attn.k", "attn.v")


@dataclass
class ActAttribution:
    """Estimated ``s_patched - s_old`` per cell: ``maps[site]`` is ``[L, S]`` for residual
    sites and ``[L, H, S]`` for head sites (query heads for ``attn.z``/``attn.q``, KV heads
    for ``attn.k``/``attn.v``). With GradDrop, ``maps`` holds the unsigned GradDrop scores and
    ``plain`` the AtP estimates; otherwise the two are the same."""

    maps: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor]
    m_old: float
    m_new: float
    tokens: list[str]
    graddrop: bool
    meta: dict = field(default_factory=dict)

    def sweep(self, site: str, head: int | None = None, *, plain: bool = False) -> Sweep:
        """One site (one head of a head site) as a :class:`~notekv.Sweep` whose values are
        ``m_old + estimate``, so ``recovery``, ``top`` and ``figure`` read as for exact sweeps."""
        maps = self.plain if plain else self.maps
        if site not in maps:
            raise InputError(f"site={site!r} was not attributed; have {sorted(maps)}")
        m = maps[site]
        if m.dim() == 3:
            if head is None or not 0 <= head < m.shape[1]:
                raise InputError(f"{site} is per head: pass head= in 0..{m.shape[1] - 1}")
            m, name = m[:, head], f"{site}.h{head}"
        elif head is not None:
            raise InputError(f"{site} has no head axis; drop head=")
        else:
            name = site
        n = m.shape[-1]
        return Sweep(name, list(range(m.shape[0])), list(range(n)), list(self.tokens), self.m_old + m.cpu(),
                     self.m_old, self.m_new, {"method": "graddrop" if self.graddrop and not plain else "attribution",
                                              **self.meta})


def _contract(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Sum over the feature axis: ``[1, S, d] -> [S]``, ``[1, H, S, D] -> [H, S]``."""
    work = torch.promote_types(delta.dtype, torch.float32)
    prod = (delta.to(work) * grad.to(work).to(delta.device))[0]
    return prod.sum(-1)


@torch.enable_grad()  # the score is computed here from a forward with gradients
def attribute_acts(model, old, new, *, answers, sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
                   graddrop: bool = False, progress: bool = False) -> ActAttribution:
    """AtP estimates of patching NEW's activation into OLD at every (layer, position[, head])
    of ``sites`` (see :data:`SITES`), read at the last token as ``logit[good] - logit[bad]``.
    ``old`` / ``new``: aligned prompts (text, TokenView or ids); ``answers``: ``(good, bad)``
    as words or ids. ``graddrop=True`` adds the GradDrop scores (``L`` more backward passes)."""
    sites = list(dict.fromkeys(sites))
    bad_sites = [s for s in sites if s not in SITES]
    if not sites or bad_sites:
        raise InputError(f"sites={sites!r}: choose from {SITES}")
    good, bad = answer_ids(model, answers)
    o_ids, o_view = _ids_of(model, old, "old")
    n_ids, _ = _ids_of(model, new, "new")
    if len(o_ids) != len(n_ids):
        raise InputError(f"old has {len(o_ids)} tokens and new {len(n_ids)}: attribution needs aligned prompts")
    L = model.spec.n_layers
    names = [f"L{l}.{s}" for l in range(L) for s in sites]
    clean = model.run(torch.tensor([n_ids]), collect=names, logits="last")
    m_new = float(clean.logits[0, -1, good] - clean.logits[0, -1, bad])
    switch = DropSwitch()
    gates = [GradGate(f"L{l}.{b}", switch) for l in range(L) for b in ("attn_out", "mlp_out")] if graddrop else []
    run = model.run(torch.tensor([o_ids]), interventions=gates + [Tap(n) for n in names], logits="last", grad=True)
    score = run.logits[0, -1, good] - run.logits[0, -1, bad]
    m_old = float(score.detach())
    deltas = {n: clean[n] - run[n] for n in names}

    def estimates(grads) -> dict[str, torch.Tensor]:
        return {s: torch.stack([_contract(deltas[f"L{l}.{s}"], grads[f"L{l}.{s}"]) for l in range(L)]) for s in sites}

    plain = estimates(run.grads(score, retain=graddrop))
    maps = plain
    if graddrop:
        acc = {s: torch.zeros_like(v) for s, v in plain.items()}
        for l in tqdm(range(L), desc="GradDrop", disable=not progress):
            switch.layer = l
            dropped = estimates(run.grads(score, retain=l < L - 1))
            for s in sites:
                acc[s] += dropped[s].abs()
        switch.layer = None
        maps = {s: v / max(1, L - 1) for s, v in acc.items()}
    tokens = list(o_view.tokens) if o_view is not None else [model.tokenizer.decode([t]) for t in o_ids]
    return ActAttribution(maps, plain, m_old, m_new, tokens, graddrop, {"model": model.name})
