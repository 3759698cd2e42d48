"""Activation attribution (AtP): every (layer, position[, head]) cell of a site at once.

Patching NEW's activation ``x_new`` into the OLD forward at one cell changes the decision
score by about ``grad . (x_new - x_old)``, the gradient taken on the OLD forward. One OLD
forward with gradient taps, one NEW forward and one backward pass give every cell of every
requested site.

The estimates come back as the results exact patching gives for the same question
(:class:`~notekv.sweep.Result`): ``att["resid_pre"]`` is a :class:`~notekv.Sweep` (layer x
slot) like ``patch_sweep(site="resid_pre")``, ``att["attn.z"]`` a
:class:`~notekv.sweep.HeadSweep` (layer x head) like ``patch_sweep(site="attn.z")``.

GradDrop (Kramar et al. 2024) guards against cancellation between a cell's direct and
indirect paths: for each layer ``l`` the backward pass is repeated with no gradient flowing
back through layer ``l``'s attention and MLP outputs, and the estimate is
``sum_l |AtP_l| / (L - 1)`` (unsigned: a score for ranking cells, not a signed effect).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Sequence

import torch

from ..errors import InputError
from ..hooks.grad import DropSwitch, GradGate, Tap
from ..hooks.positions import TokenView
from ..hooks.sites import RESIDUAL_SITES
from ..runner import progress_bar
from ..sweep import HeadSweep, Sweep, _ids_of, _slot_arg, answer_ids, first_diff_of

SITES = RESIDUAL_SITES + ("attn.z", "attn.q", "attn.k", "attn.v")


class ActAttribution(Mapping):
    """AtP estimates of patching NEW's activation into OLD, every cell of several sites from
    one backward pass, read as the results of exact patching: ``att[site]`` is a
    :class:`~notekv.Sweep` (layer x slot) for residual sites and a
    :class:`~notekv.sweep.HeadSweep` (layer x head: each head patched at every slot from the
    first difference, summed; :meth:`result` takes other ``slots``) for head sites (query
    heads for ``attn.z``/``attn.q``, KV heads for ``attn.k``/``attn.v``). Their ``values``
    are ``m_old + estimate``, so ``recovery``, ``top``, ``figure`` and ``to_json`` read as
    for ``patch_sweep``; ``meta["method"]`` is ``"attribution"`` (or ``"graddrop"``).

    ``att.sweep("attn.z", head=3)``: one head's layer x slot map; ``att.estimate(site)``: the
    raw estimates ``[L, S]`` / ``[L, H, S]`` (with GradDrop the unsigned scores;
    ``plain=True``: the AtP estimates). ``maps`` and ``plain`` (dicts of the raw estimates)
    are deprecated names of :meth:`estimate`.
    """

    def __init__(self, maps: dict[str, torch.Tensor], plain: dict[str, torch.Tensor], m_old: float, m_new: float,
                 tokens: list[str], graddrop: bool, meta: dict | None = None, *, ids: Sequence[int] | None = None,
                 view: TokenView | None = None):
        self._est, self._plain = dict(maps), dict(plain)
        self.m_old, self.m_new = float(m_old), float(m_new)
        self.tokens, self.graddrop = list(tokens), bool(graddrop)
        self.meta = dict(meta or {})
        self._ids, self._view = list(ids) if ids is not None else None, view

    # ------------------------------------------------------------------ the mapping of results
    def __getitem__(self, site: str) -> Sweep | HeadSweep:
        return self.result(site)

    def __iter__(self):
        return iter(self._est)

    def __len__(self) -> int:
        return len(self._est)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (f"ActAttribution(sites={list(self._est)}, m_old={self.m_old:.4g}, m_new={self.m_new:.4g}, "
                f"method={self._method(False)!r})")

    @property
    def sites(self) -> list[str]:
        return list(self._est)

    def _method(self, plain: bool) -> str:
        return "graddrop" if self.graddrop and not plain else "attribution"

    def estimate(self, site: str, *, plain: bool = False) -> torch.Tensor:
        """The raw estimates of ``s_patched - s_old`` at ``site``: ``[L, S]`` (residual sites) or
        ``[L, H, S]`` (head sites). With GradDrop the unsigned GradDrop scores, or with
        ``plain=True`` the AtP estimates."""
        maps = self._plain if plain else self._est
        if not isinstance(site, str) or site not in maps:
            raise InputError(f"site={site!r} was not attributed; have {sorted(maps)} (pass it in sites= of "
                             "attribute_acts)")
        return maps[site]

    def result(self, site: str, *, slots=None, plain: bool = False) -> Sweep | HeadSweep:
        """``site``'s estimates as the exact result's kind: a :class:`~notekv.Sweep` (layer x
        slot) or, for a head site, a :class:`~notekv.sweep.HeadSweep` (layer x head) whose
        head patches every slot of ``slots`` at once (estimates summed over them). ``slots``:
        head sites only; default every slot from the first difference (as
        ``patch_sweep(site="attn.z")``); a list of slots or a selector (``nk.Last()``)."""
        m = self.estimate(site, plain=plain)
        meta = {**self.meta, "method": self._method(plain)}
        if m.dim() == 2:
            if slots is not None:
                raise InputError(f"slots={slots!r}: {site} is a layer x slot map; slots= chooses where a head "
                                 "site's heads are patched (use it with attn.z/q/k/v)")
            return self.sweep(site, plain=plain)
        n = m.shape[-1]
        ids = self._ids if self._ids is not None else list(range(n))
        d = int(self.meta.get("first_diff", 0))
        chosen = list(range(d, n)) if slots is None else sorted(set(_slot_arg(slots, ids, self._view, n)))
        bad = [p for p in chosen if not 0 <= p < n]
        if bad:
            raise InputError(f"slots: slot {bad[0]} is outside 0..{n - 1} (the prompt); pass slots of the prompt")
        est = m[:, :, chosen].sum(-1).cpu() if chosen else torch.zeros(m.shape[:2])
        return HeadSweep(site, list(range(m.shape[0])), list(range(m.shape[1])), chosen,
                         [self.tokens[p] for p in chosen], self.m_old + est, self.m_old, self.m_new, meta)

    def sweep(self, site: str, head: int | None = None, *, plain: bool = False) -> Sweep:
        """One site (one head of a head site) as a layer x slot :class:`~notekv.Sweep` whose
        values are ``m_old + estimate``."""
        m = self.estimate(site, plain=plain)
        if m.dim() == 3:
            if head is None or isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < m.shape[1]:
                raise InputError(f"head={head!r}: {site} is per head: pass head= in 0..{m.shape[1] - 1} "
                                 f"(or att[{site!r}] for the layer x head result)")
            m, name = m[:, head], f"{site}.h{head}"
        elif head is not None:
            raise InputError(f"head={head!r}: {site} has no head axis; drop head=")
        else:
            name = site
        n = m.shape[-1]
        return Sweep(name, list(range(m.shape[0])), list(range(n)), list(self.tokens), self.m_old + m.cpu(),
                     self.m_old, self.m_new, {**self.meta, "method": self._method(plain)})

    def to_json(self) -> dict:
        """Every site's result (:meth:`result`) as JSON, keyed by site."""
        return {"m_old": self.m_old, "m_new": self.m_new, "method": self._method(False), **self.meta,
                "sites": {s: self.result(s).to_json() for s in self._est}}

    # ------------------------------------------------------------------ deprecated names
    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """Deprecated: ``att.estimate(site)`` (or ``att[site]``, a result with recovery)."""
        warnings.warn("ActAttribution.maps is deprecated: att.estimate(site) gives the raw estimates, att[site] the "
                      "result (Sweep or HeadSweep) with recovery", DeprecationWarning, stacklevel=2)
        return dict(self._est)

    @property
    def plain(self) -> dict[str, torch.Tensor]:
        """Deprecated: ``att.estimate(site, plain=True)``."""
        warnings.warn("ActAttribution.plain is deprecated: att.estimate(site, plain=True) gives the AtP estimates",
                      DeprecationWarning, stacklevel=2)
        return dict(self._plain)


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
    as words or ids. ``graddrop=True`` adds the GradDrop scores (``L`` more backward passes).
    Returns an :class:`ActAttribution`: ``att[site]`` is the :class:`~notekv.Sweep` or
    :class:`~notekv.sweep.HeadSweep` that ``patch_sweep(model, old, new, site=site)`` would
    return, with estimated values."""
    if isinstance(sites, str):
        sites = (sites,)
    try:
        sites = list(dict.fromkeys(sites))
    except TypeError:
        raise InputError(f"sites={sites!r}: pass a list of site names from {SITES}") from None
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
        for l in progress_bar(range(L), progress=progress, desc="GradDrop"):
            switch.layer = l
            dropped = estimates(run.grads(score, retain=l < L - 1))
            for s in sites:
                acc[s] += dropped[s].abs()
        switch.layer = None
        maps = {s: v / max(1, L - 1) for s, v in acc.items()}
    tokens = list(o_view.tokens) if o_view is not None else [model.tokenizer.decode([t]) for t in o_ids]
    return ActAttribution(maps, plain, m_old, m_new, tokens, graddrop,
                          {"model": model.name, "first_diff": first_diff_of(o_ids, n_ids)}, ids=o_ids, view=o_view)
