"""Per-layer RoPE as data, and the exact key rotation by a position delta.

A cached key at position ``p`` is ``m * R(p) k`` (``m`` the attention factor folded into
cos/sin by YaRN, 1 otherwise). Moving it to ``p + d`` needs only ``R(d)`` with the layer's
raw frequencies — never the attention factor, which the key already carries — so
repositioning is exact for every shift-invariant RoPE: default, linear, llama3, YaRN,
partial rotary (only the first ``rotary_dim`` dims turn), half-split (NeoX/Llama) and
interleaved (GPT-J, Cohere) pairing, per-layer bases (Gemma-3 local 1e4 / global 1e6) and
layers without RoPE (``rotary_dim == 0``: their keys stay as they are). Dynamic NTK changes
frequencies with the sequence length; it is refused. LongRoPE rotates with its short factors
while a forward stays below ``original_max_position_embeddings`` and with its long factors for
every key once it reaches it, so a move is exact only below that switch
(:func:`check_positions` refuses the rest).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..model.arch import SHIFT_INVARIANT_ROPE, ArchSpec, RopeFacts, UnsupportedArchitectureError


class UnsupportedRopeError(UnsupportedArchitectureError):
    """A RoPE variant whose keys cannot be moved by a rotation (a ``ValueError``)."""


@dataclass(frozen=True)
class RopeSpec(RopeFacts):
    """RoPE of one layer (the fields of :class:`~notekv.model.arch.RopeFacts`: ``inv_freq`` in
    radians per position after any frequency scaling, ``rotary_dim`` of ``head_dim`` dims,
    ``pairing`` ``"half"`` or ``"interleaved"``, ``attention_factor`` — informational, never
    re-applied), with the checks and serialization the KV floor needs."""

    @classmethod
    def from_facts(cls, facts: RopeFacts) -> "RopeSpec":
        return cls(**asdict(facts))

    def check(self) -> "RopeSpec":
        if self.rotary_dim == 0 and not self.unsupported:  # NoPE: nothing turns
            return self
        if self.unsupported or self.rope_type not in SHIFT_INVARIANT_ROPE:
            raise UnsupportedRopeError(self.unsupported or f"RoPE type {self.rope_type!r} is not supported")
        if self.pairing not in ("half", "interleaved"):
            raise UnsupportedRopeError(f"RoPE pairing {self.pairing!r}: expected 'half' or 'interleaved'")
        if self.rotary_offset + self.rotary_dim > self.head_dim or self.rotary_dim % 2 or self.rotary_offset < 0:
            raise UnsupportedRopeError(f"rotary dims {self.rotary_offset}..{self.rotary_offset + self.rotary_dim} "
                                       f"do not fit head_dim {self.head_dim}")
        return self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RopeSpec":
        return cls(**{**d, "inv_freq": tuple(d["inv_freq"])})


def layer_specs(spec: ArchSpec, check: bool = False) -> tuple[RopeSpec, ...]:
    """The per-layer RoPE specs of a model; ``check=True`` raises on unsupported variants
    (a cache of such a model can exist; moving its keys cannot)."""
    specs = tuple(RopeSpec.from_facts(f) for f in spec.rope)
    if check:
        for s in specs:
            s.check()
    return specs


def rope_table(specs: tuple[RopeSpec, ...]) -> tuple[torch.Tensor, int, str]:
    """``(inv_freq [L, R/2], rotary_dim, pairing)`` of per-layer ``specs`` for the fused op.

    Layers without RoPE (``rotary_dim == 0``) get zero frequencies: a turn by angle 0 is
    the identity (``x * 1 - y * 0``), so their keys pass through unchanged."""
    r = {(s.rotary_dim, s.pairing) for s in specs if s.rotary_dim}
    if len(r) > 1:
        from ..errors import InputError

        raise InputError(f"layers disagree on rotary_dim/pairing {r}; the fused op needs one")
    rotary_dim, pairing = next(iter(r)) if r else (0, "half")
    zero = (0.0,) * (rotary_dim // 2)
    inv = [s.inv_freq if s.rotary_dim else zero for s in specs]
    return torch.tensor(inv, dtype=torch.float64).reshape(len(specs), rotary_dim // 2), rotary_dim, pairing


def rope_offset(specs: tuple[RopeSpec, ...]) -> int:
    """The dim where the rotary part of every layer's keys starts (MLA: ``qk_nope_head_dim``;
    0 elsewhere), for the fused op."""
    offsets = {s.rotary_offset for s in specs if s.rotary_dim}
    if len(offsets) > 1:
        from ..errors import InputError

        raise InputError(f"layers disagree on where the rotary dims start {sorted(offsets)}; the fused op needs one")
    return next(iter(offsets), 0)


def check_positions(specs: tuple[RopeSpec, ...], positions: torch.Tensor, what: str, model_type: str = "") -> None:
    """Refuse (:class:`UnsupportedRopeError`) keys at ``positions`` (int ``[N]``, the positions
    keys are moved from or to) that reach a LongRoPE switch: a forward reaching position
    ``switch_at`` rotates every key with the long factors, so a cached key there is not a
    rotation of the key at another position."""
    limits = [s.switch_at for s in specs if s.switch_at is not None]
    if not limits or not positions.numel():
        return
    limit, top = min(limits), int(positions.max())
    if top >= limit:
        family = f"{model_type} " if model_type else ""
        raise UnsupportedRopeError(
            f"{what}: keys at position {top} of this {family}model: its LongRoPE switches to the long factors for "
            f"every key once a forward reaches position {limit} (original_max_position_embeddings), so keys at or "
            f"past it are not rotations of keys below it; keep cached and moved keys below position {limit}"
        )


def angles(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of ``delta[:, None] * inv_freq[None, :]``, float32 ``[N, R/2]``.

    The angle is formed in float64 turns and its whole turns dropped before rounding to
    float32, so large deltas lose no precision (the fused kernel does exactly the same).
    """
    t = delta.to(torch.float64)[:, None] * (inv_freq.to(torch.float64) / (2 * math.pi))[None, :]
    a = (t - torch.floor(t)).to(torch.float32) * torch.tensor(2 * math.pi, dtype=torch.float32)
    return torch.cos(a), torch.sin(a)


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, pairing: str = "half",
         offset: int = 0) -> torch.Tensor:
    """The one RoPE rotation of notekv: rotate the first ``rotary_dim`` dims of ``x [..., N, D]``
    by angles whose ``cos``/``sin`` are ``[N, rotary_dim / 2]`` (one per pair), in ``x``'s dtype.

    ``pairing="half"`` pairs dim ``i`` with ``i + rotary_dim/2`` (Llama/NeoX), ``"interleaved"``
    pairs ``2i`` with ``2i + 1`` (GPT-J); dims past ``rotary_dim`` pass through. ``offset``: the
    rotary part starts at dim ``offset`` (MLA keys: after the un-rotated ``qk_nope`` dims), the
    dims before it pass through too. Used by key repositioning (:func:`rotate`), the fused op's
    torch reference and the lean forward, whose bitwise agreement with the HF rotary
    (``x*cos + rotate_half(x)*sin``) the tests check.
    """
    if offset:
        return torch.cat([x[..., :offset], turn(x[..., offset:], cos, sin, rotary_dim, pairing)], dim=-1)
    r = rotary_dim
    if pairing == "half":
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if r < x.shape[-1]:
            parts.append(x[..., r:])
        return torch.cat(parts, dim=-1)
    x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
    out = x.clone()
    out[..., 0:r:2] = x1 * cos - x2 * sin
    out[..., 1:r:2] = x2 * cos + x1 * sin
    return out


def rotate(k: torch.Tensor, delta: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate keys ``k`` ``[..., N, D]`` by per-token ``delta`` ``[N]`` (or a scalar).

    Computed in float32, returned in ``k.dtype``. Only dims ``rotary_offset ..
    rotary_offset + rotary_dim`` turn; the others pass through.
    """
    n = k.shape[-2]
    delta = torch.as_tensor(delta, device=k.device)
    if delta.dim() == 0:
        delta = delta.expand(n)
    cos, sin = angles(delta.cpu(), torch.tensor(spec.inv_freq, dtype=torch.float64))
    cos, sin = cos.to(k.device), sin.to(k.device)
    return turn(k.to(torch.float32), cos, sin, spec.rotary_dim, spec.pairing, spec.rotary_offset).to(k.dtype)
