"""Edges of the notes graph of one pair, their attribution scores and their exact values.

Nodes: the field; every cell ``(l, c)`` (layer ``l``, slot ``first + c`` from the first field
slot to the last cached slot: the field's own K/V and the notes after it); every query head
``(l, h)`` at the decision; the logit difference. Edges, ``N = L*C + L*C*Hq + L*Hq`` of them,
in this flat order:

* ``fc`` field -> cell ``(l, c)`` ``[L, C]``: the cell holds NEW's K/V (what the changed field
  makes it write) instead of OLD's;
* ``ch`` cell ``(l, c)`` -> head ``(l, h)`` ``[L, C, Hq]``: head ``h`` of layer ``l`` reads
  that cell (a head reads only its own layer's cache);
* ``hl`` head ``(l, h)`` -> logit ``[L, Hq]``: the head's decision output reaches the logits.

A circuit (a set of edges) is evaluated exactly (:func:`evaluate`): head ``(l, h)`` reads
NEW's K/V at cell ``(l, c)`` iff both ``fc(l, c)`` and ``ch(l, c, h)`` are in it, its output
is recomputed with its query frozen (:func:`notekv.graph.readout.head_z`) and replaces OLD's
iff ``hl(l, h)`` is in it; everything else stays at OLD. One edge's exact value (direct path
patching, :func:`exact_edges`) is the circuit of that edge with its sender at NEW: for
``ch`` every cell at NEW and read only by that head, for ``fc`` that cell read by every head
of its layer, for ``hl`` that head reading every cell at NEW.

Attribution (:func:`attribute`), all in logits of ``s = logit[good] - logit[bad]``:

* ``plain`` (EAP): the gradient at OLD times the sender's change; for ``ch``,
  ``grad_k . dk + grad_v . dv`` through that head's attention;
* ``fixed`` (EAP with the AtP* key fix): ``ch`` is ``grad_z . (z_patched - z_old)``, with the
  head's attention recomputed exactly for that one cell;
* ``ig`` (EAP-IG): gradients averaged over ``steps`` points of the straight path from OLD's
  K/V to NEW's (every cell moving together), times the sender's change.

``fc`` is the sum of a cell's ``ch`` edges and ``hl`` is ``grad_z . (z_full - z_old)``
(``z_full``: the head reading every cell at NEW) under each method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Bool, Float

from ..attribution.kv import _key_fixed
from ..errors import InputError
from ..runner import progress_bar
from .readout import Decision, head_z, interpolated_z, readout, readout_grad, with_sink

METHODS = ("plain", "fixed", "ig")
KINDS = ("fc", "ch", "hl")
CHUNK = 64  # circuits per readout chunk (their masks are built per chunk)


@dataclass(frozen=True)
class EdgeIndex:
    """The flat edge order of a graph with ``L`` layers, ``C`` cells and ``H`` query heads."""

    L: int
    C: int
    H: int

    @property
    def n_fc(self) -> int:
        return self.L * self.C

    @property
    def n_ch(self) -> int:
        return self.L * self.C * self.H

    @property
    def n(self) -> int:
        return self.n_fc + self.n_ch + self.L * self.H

    def decode(self, i: int) -> tuple:
        """``("fc", l, c)``, ``("ch", l, c, h)`` or ``("hl", l, h)`` of flat edge ``i``."""
        if not 0 <= i < self.n:
            raise InputError(f"edge {i}: outside 0..{self.n - 1}")
        if i < self.n_fc:
            return ("fc", *divmod(i, self.C))
        i -= self.n_fc
        if i < self.n_ch:
            l, rest = divmod(i, self.C * self.H)
            return ("ch", l, *divmod(rest, self.H))
        return ("hl", *divmod(i - self.n_ch, self.H))

    def split(self, flat: Bool[torch.Tensor, "R N"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fc [R, L, C], ch [R, L, C, H], hl [R, L, H])`` views of flat edge masks."""
        R = flat.shape[0]
        return (flat[:, : self.n_fc].view(R, self.L, self.C),
                flat[:, self.n_fc: self.n_fc + self.n_ch].view(R, self.L, self.C, self.H),
                flat[:, self.n_fc + self.n_ch:].view(R, self.L, self.H))


@dataclass
class EdgeScores:
    """One method's score of every edge (float64, CPU): ``fc [L, C]``, ``ch [L, C, H]``,
    ``hl [L, H]``, in logits of ``s``."""

    fc: torch.Tensor
    ch: torch.Tensor
    hl: torch.Tensor

    def flat(self) -> Float[torch.Tensor, "N"]:
        return torch.cat([self.fc.reshape(-1), self.ch.reshape(-1), self.hl.reshape(-1)])

    def to_dict(self) -> dict:
        return {"fc": self.fc.tolist(), "ch": self.ch.tolist(), "hl": self.hl.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeScores":
        return cls(*(torch.tensor(d[k], dtype=torch.float64) for k in KINDS))


def index_of(dec: Decision) -> EdgeIndex:
    return EdgeIndex(dec.n_layers, dec.n_cells, dec.n_heads)


def circuit_z(dec: Decision, flat: Bool[torch.Tensor, "R N"]) -> Float[torch.Tensor, "R L Hq D"]:
    """Every head's decision output under each circuit (row of flat edge masks)."""
    idx = index_of(dec)
    fc, ch, hl = idx.split(flat.to(dec.q.device))
    reads = (fc[..., None] & ch).permute(0, 1, 3, 2)  # [R, L, H, C]
    z = head_z(dec, reads)
    return torch.where(hl[..., None], z, dec.z_old[None])


def evaluate(model, dec: Decision, n: int, masks: Callable[[range], torch.Tensor], *, progress: bool = False,
             desc: str = "circuits") -> Float[torch.Tensor, "n"]:
    """``s`` (float64, CPU) of ``n`` circuits, ``masks(rows)`` giving the flat edge masks
    ``[len(rows), N]`` of a chunk of them (built per chunk: memory stays flat in ``n``)."""
    out = torch.empty(n, dtype=torch.float64)
    for start in progress_bar(range(0, n, CHUNK), progress=progress, desc=desc, leave=False):
        rows = range(start, min(start + CHUNK, n))
        out[rows.start: rows.stop] = readout(model, dec, circuit_z(dec, masks(rows)))
    return out


def single_edge_masks(idx: EdgeIndex, edges: list[int]) -> Callable[[range], torch.Tensor]:
    """Masks of the direct path patching circuit of each edge (its sender at NEW, only that
    edge into its receiver, the receiver's output on to the logits)."""
    def masks(rows: range) -> torch.Tensor:
        out = torch.zeros(len(rows), idx.n, dtype=torch.bool)
        for r, e in enumerate(edges[rows.start: rows.stop]):
            kind, l, *rest = idx.decode(e)
            fc, ch, hl = idx.split(out[r: r + 1])
            if kind == "fc":
                fc[0, l, rest[0]] = True
                ch[0, l, rest[0]] = True
                hl[0, l] = True
            elif kind == "ch":
                c, h = rest
                fc[0, l, c] = ch[0, l, c, h] = hl[0, l, h] = True
            else:
                h = rest[0]
                fc[0, l] = True
                ch[0, l, :, h] = True
                hl[0, l, h] = True
        return out
    return masks


def exact_edges(model, dec: Decision, edges: list[int], *, progress: bool = False) -> Float[torch.Tensor, "n"]:
    """``s - s_old`` (logits, float64) of direct path patching each edge (flat indices)."""
    idx = index_of(dec)
    edges = [int(e) for e in edges]
    for e in edges:
        idx.decode(e)
    s = evaluate(model, dec, len(edges), single_edge_masks(idx, edges), progress=progress, desc="exact edges")
    return s - dec.s_old


def full_circuit(dec: Decision) -> Float[torch.Tensor, "L Hq D"]:
    """Every head's output reading every cell at NEW."""
    return head_z(dec, torch.ones(1, dec.n_layers, dec.n_heads, dec.n_cells, dtype=torch.bool))[0]


def attribute(model, dec: Decision, *, steps: int = 8, progress: bool = False) -> dict[str, EdgeScores]:
    """``{"plain", "fixed", "ig"}`` edge scores of one pair (see the module docstring).
    ``steps``: points of the OLD -> NEW path IG averages over (midpoints ``(i + 1/2) / steps``)."""
    L, H, c0 = dec.n_layers, dec.n_heads, dec.first
    dz_full = full_circuit(dec) - dec.z_old  # [L, H, D]
    bar = progress_bar(total=2 + L, progress=progress, desc="edge attribution", leave=False)
    out: dict[str, EdgeScores] = {}
    for name, alpha in (("plain", torch.zeros(1)), ("ig", (torch.arange(steps, dtype=torch.float64) + 0.5) / steps)):
        with torch.no_grad():
            z = torch.stack([interpolated_z(dec, l, alpha)[0] for l in range(L)], 1).detach()  # [R, L, H, D]
        _, gz = readout_grad(model, dec, z)
        hl = (gz * dz_full[None]).sum(-1).mean(0)
        ch = torch.empty(L, dec.n_cells, H, dtype=dec.q.dtype, device=dec.q.device)
        with torch.enable_grad():
            for l in range(L):
                zl, k, v = interpolated_z(dec, l, alpha)
                gk, gv = torch.autograd.grad(zl, (k, v), grad_outputs=gz[:, l])
                dk = dec.rep(dec.k_new[l, :, c0:] - dec.k_old[l, :, c0:])
                dv = dec.rep(dec.v_new[l, :, c0:] - dec.v_old[l, :, c0:])
                ch[l] = ((gk * dk).sum(-1) + (gv * dv).sum(-1)).mean(0).T
                if name == "ig":
                    bar.update(1)
        out[name] = EdgeScores(ch.sum(-1).double().cpu(), ch.double().cpu(), hl.double().cpu())
        bar.update(1)
        if name == "plain":
            out["fixed"] = _fixed(dec, gz[0], hl)
    bar.close()
    return {m: out[m] for m in METHODS}


def _fixed(dec: Decision, gz: torch.Tensor, hl: torch.Tensor) -> EdgeScores:
    """EAP with the AtP* key fix: each cell -> head edge recomputes that head's attention
    exactly for the one patched cell (K and V), times the gradient at OLD."""
    L, c0, S = dec.n_layers, dec.first, dec.n_slots
    ch = []
    for l in range(L):
        rep = lambda x: dec.rep(x)[None]  # noqa: E731  [1, Hq, ...]
        _, both = _key_fixed(dec.q[l][None], with_sink(dec, l, dec.scores[l][None]), gz[l][None], rep(dec.k_old[l]),
                             rep(dec.k_new[l]), rep(dec.v_old[l]), rep(dec.v_new[l]), rep(dec.v_self[l]), dec.scaling[l],
                             dec.softcap, 1)
        ch.append(both[0, :, c0:S].T)  # [C, H]
    ch = torch.stack(ch)
    return EdgeScores(ch.sum(-1).double().cpu(), ch.double().cpu(), hl.double().cpu())
