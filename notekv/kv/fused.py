"""The fused KV-rotation op: every layer and every slot of a move in one launch.

``rotate_keys(src, delta, inv_freq, ...)`` reads keys stacked over layers
``[L, B, H, S_src, D]``, rotates the tokens ``src_index`` by per-token ``delta`` with each
layer's frequencies and writes them to ``dst`` at ``dst_index`` (in place when ``dst`` is
``src``). On CUDA a Triton kernel does this in one launch (one read and one write of
each key: copy bandwidth); elsewhere the torch reference with the same signature runs. The
Triton kernel also runs on CPU under ``TRITON_INTERPRET=1``, which is how it is tested.
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import InputError
from ..model.arch import OutOfRangeError
from .rope import angles, turn

try:  # Triton is optional: CUDA wheels ship it; the CPU build does not need it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False


def _check(src, dst, delta, inv_freq, src_index, dst_index, rotary_dim, pairing, offset=0):
    if src.dim() != 5 or dst.dim() != 5:
        raise InputError(f"src/dst: keys must be stacked [L, B, H, S, D]; got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.shape[:3] != dst.shape[:3] or src.shape[4] != dst.shape[4]:
        raise InputError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ outside the slot axis; "
                         "they must agree in layers, batch, heads and head_dim")
    n = src_index.numel()
    if delta.numel() != n or dst_index.numel() != n:
        raise InputError(f"delta ({delta.numel()}), src_index ({n}) and dst_index ({dst_index.numel()}) must match: "
                         "one delta and one destination per moved slot")
    if inv_freq.shape != (src.shape[0], rotary_dim // 2):
        raise InputError(f"inv_freq must be [L, rotary_dim/2] = {(src.shape[0], rotary_dim // 2)}, got {tuple(inv_freq.shape)}")
    if rotary_dim > src.shape[-1] or rotary_dim % 2:
        raise InputError(f"rotary_dim={rotary_dim}: rotary_dim {rotary_dim} does not fit head_dim {src.shape[-1]} "
                         "(an even number up to head_dim)")
    if offset < 0 or offset + rotary_dim > src.shape[-1]:
        raise InputError(f"offset={offset}: rotary dims {offset}..{offset + rotary_dim} do not fit head_dim "
                         f"{src.shape[-1]}")
    if pairing not in ("half", "interleaved"):
        raise InputError(f"pairing={pairing!r}: expected 'half' or 'interleaved'")
    if n and (int(src_index.max()) >= src.shape[3] or int(dst_index.max()) >= dst.shape[3]):
        raise OutOfRangeError(f"src_index/dst_index: slot index out of range: src holds {src.shape[3]} slots, "
                              f"dst {dst.shape[3]}")


def rotate_keys_reference(src, dst, delta, inv_freq, src_index, dst_index, rotary_dim, pairing="half", offset=0):
    """Torch reference of :func:`rotate_keys` (same arguments, same result)."""
    x = src.index_select(3, src_index.to(src.device)).to(torch.float32)  # a gather: safe in place
    out = torch.empty_like(x)
    for l in range(src.shape[0]):
        cos, sin = angles(delta.cpu(), inv_freq[l].cpu())
        out[l] = turn(x[l], cos.to(src.device), sin.to(src.device), rotary_dim, pairing, offset)
    dst.index_copy_(3, dst_index.to(dst.device), out.to(dst.dtype))
    return dst


if HAVE_TRITON:

    @triton.jit
    def _round_bf16(x):
        # Round-to-nearest-even to bfloat16, done on the float32 bits so that the final cast
        # is exact whatever rounding the backend's cast uses (the CPU interpreter truncates).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _rotate_kernel(
        src_ptr, dst_ptr, inv_ptr, delta_ptr, sidx_ptr, didx_ptr,
        N, BH, S_SRC, S_DST,
        D: tl.constexpr, HALF_R: tl.constexpr, INTERLEAVED: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, PASS: tl.constexpr,
        OFF: tl.constexpr,
    ):
        pid = tl.program_id(0)  # over L * BH
        blk = tl.program_id(1)  # over token blocks
        layer = pid // BH
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        s_slot = tl.load(sidx_ptr + n, mask=nmask, other=0).to(tl.int64)
        d_slot = tl.load(didx_ptr + n, mask=nmask, other=0).to(tl.int64)
        delta = tl.load(delta_ptr + n, mask=nmask, other=0).to(tl.float64)
        src_row = src_ptr + pid.to(tl.int64) * S_SRC * D + s_slot * D  # [BLOCK_N]
        dst_row = dst_ptr + pid.to(tl.int64) * S_DST * D + d_slot * D
        j = tl.arange(0, BLOCK_J)
        jmask = j < HALF_R
        # Frequencies arrive in turns per position (inv_freq / 2π, float64): the angle's
        # integer turns drop out exactly before anything is rounded to float32.
        turns_per_pos = tl.load(inv_ptr + layer * HALF_R + j, mask=jmask, other=0.0).to(tl.float64)
        t = delta[:, None] * turns_per_pos[None, :]
        t = t - tl.floor(t)
        a32 = t.to(tl.float32) * 6.283185307179586
        c = tl.cos(a32)
        s = tl.sin(a32)
        m = nmask[:, None] & jmask[None, :]
        if INTERLEAVED:  # the rotary dims start at OFF (MLA keys: after the un-rotated part)
            i1 = OFF + 2 * j
            i2 = OFF + 2 * j + 1
        else:
            i1 = OFF + j
            i2 = OFF + j + HALF_R
        x1 = tl.load(src_row[:, None] + i1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src_row[:, None] + i2[None, :], mask=m, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        out_ty = dst_ptr.dtype.element_ty
        if out_ty == tl.bfloat16:
            y1 = _round_bf16(y1)
            y2 = _round_bf16(y2)
        tl.store(dst_row[:, None] + i1[None, :], y1.to(out_ty), mask=m)
        tl.store(dst_row[:, None] + i2[None, :], y2.to(out_ty), mask=m)
        if PASS:  # dims before OFF and past OFF + rotary_dim pass through
            p = tl.arange(0, BLOCK_P)
            p = tl.where(p < OFF, p, p + 2 * HALF_R)
            pm = nmask[:, None] & (p < D)[None, :]
            v = tl.load(src_row[:, None] + p[None, :], mask=pm, other=0.0)
            tl.store(dst_row[:, None] + p[None, :], v.to(dst_ptr.dtype.element_ty), mask=pm)


def _triton_available_for(t: torch.Tensor) -> bool:
    if not HAVE_TRITON:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def rotate_keys_triton(src, dst, delta, inv_freq, src_index, dst_index, rotary_dim, pairing="half", offset=0):
    """One Triton launch over all layers, heads and tokens. ``src``/``dst`` contiguous."""
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise InputError("src/dst: the Triton rotation needs contiguous [L, B, H, S, D] tensors; call .contiguous()")
    n = src_index.numel()
    if n == 0:
        return dst
    if src.data_ptr() == dst.data_ptr() and not torch.equal(src_index.cpu(), dst_index.cpu()):
        # In place with moved slots could read a slot already overwritten: go through a copy.
        src = src.clone()
    L, B, H, _, D = src.shape
    half = rotary_dim // 2
    dev = src.device
    block_n = 16 if D <= 128 else 8
    grid = (L * B * H, triton.cdiv(n, block_n))
    _rotate_kernel[grid](
        src, dst, (inv_freq.to(torch.float64) / (2 * math.pi)).to(dev).contiguous(),
        delta.to(dev, torch.int64).contiguous(),
        src_index.to(dev, torch.int64).contiguous(), dst_index.to(dev, torch.int64).contiguous(),
        n, B * H, src.shape[3], dst.shape[3],
        D=D, HALF_R=half, INTERLEAVED=pairing == "interleaved",
        BLOCK_N=block_n, BLOCK_J=triton.next_power_of_2(half),
        BLOCK_P=triton.next_power_of_2(max(D - rotary_dim, 1)), PASS=rotary_dim < D, OFF=offset,
    )
    return dst


def rotate_keys(
    src: torch.Tensor,
    delta: torch.Tensor | int,
    inv_freq: torch.Tensor,
    *,
    rotary_dim: int,
    pairing: str = "half",
    dst: torch.Tensor | None = None,
    src_index: torch.Tensor | None = None,
    dst_index: torch.Tensor | None = None,
    backend: str = "auto",
    offset: int = 0,
) -> torch.Tensor:
    """Rotate stacked keys by per-token position deltas, all layers in one call.

    ``src``: ``[L, B, H, S_src, D]``; ``delta``: ``[N]`` integer deltas (or one int for all);
    ``inv_freq``: ``[L, rotary_dim / 2]`` per-layer frequencies (radians per position);
    ``src_index``/``dst_index``: ``[N]`` slots read / written (default all slots of ``src``,
    same slots in ``dst``); ``dst``: ``[L, B, H, S_dst, D]`` preallocated output (default:
    ``src``, in place). ``offset``: the rotary dims are ``offset .. offset + rotary_dim`` (MLA
    keys: after the un-rotated part); the other dims are copied. Returns ``dst``.
    ``backend``: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else torch),
    ``"torch"`` or ``"triton"``.
    """
    dst = src if dst is None else dst
    if src_index is None:
        src_index = torch.arange(src.shape[3])
    if dst_index is None:
        dst_index = src_index
    delta = torch.as_tensor(delta, dtype=torch.int64)
    if delta.dim() == 0:
        delta = delta.expand(src_index.numel()).contiguous()
    _check(src, dst, delta, inv_freq, src_index, dst_index, rotary_dim, pairing, offset)
    if backend == "auto":
        backend = "triton" if _triton_available_for(src) else "torch"
    if backend == "triton":
        if not _triton_available_for(src):
            raise RuntimeError("the Triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 set before import)")
        return rotate_keys_triton(src, dst, delta, inv_freq, src_index, dst_index, rotary_dim, pairing, offset)
    if backend != "torch":
        raise InputError(f"backend={backend!r}: choose 'auto', 'torch' or 'triton'")
    return rotate_keys_reference(src, dst, delta, inv_freq, src_index, dst_index, rotary_dim, pairing, offset)


__all__ = ["HAVE_TRITON", "rotate_keys", "rotate_keys_reference", "rotate_keys_triton"]
