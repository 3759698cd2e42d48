"""Splicing: assemble a prefix and precompiled chunks into one cache at O(L) cost.

Each chunk (a :class:`KVCache` prefilled on its own, at any positions) is placed after what
precedes it: values are copied, keys rotated by (new position - original position) with
each layer's RoPE, written by the fused op straight into one preallocated buffer. Text parts
are prefilled in place against everything before them. Optional seam repair recomputes the
first ``seam`` tokens of each chunk against the real preceding context.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError, check_int
from .cache import KVCache, PositionError, write_slots
from .fused import rotate_keys
from .rope import check_positions, rope_offset


def _tokens(model, text: str, first: bool) -> list[int]:
    return list(model.tokenize(text, special=first).ids)


def splice(model, parts: Sequence["KVCache | str"], *, seam: int = 0, labels: Sequence[str] | None = None,
           backend: str = "auto") -> KVCache:
    """One cache holding ``parts`` in order, positions ``0 .. total - 1``.

    ``parts``: KVCaches (moved into place) or texts (prefilled after what precedes them;
    only the first part gets BOS). ``seam``: recompute the first ``seam`` tokens of every
    chunk after the first part with their real context. ``labels``: segment label per part
    (default: the chunk's own labels, ``"text{i}"`` for texts). ``model.run(suffix,
    past=cache)`` and ``model.generate(..., past=cache)`` continue from the result.
    """
    if model.spec.kv_refusal is not None:
        from ..model.arch import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(f"splice on this {model.spec.model_type} model: {model.spec.kv_refusal}")
    if isinstance(parts, (str, KVCache)) or not parts:
        raise InputError("splice needs a list of parts (KVCaches and texts), at least one")
    check_int("seam", seam, low=0)
    if labels is not None and len(labels) != len(parts):
        raise InputError(f"labels: {len(labels)} labels for {len(parts)} parts; give one per part")
    ids_of: list[list[int] | None] = []
    for i, p in enumerate(parts):
        if isinstance(p, KVCache):
            p.check_model(model)
            if not len(p):
                raise InputError(f"splice part {i} is an empty KVCache; drop it")
            ids_of.append(None)
        elif isinstance(p, str):
            ids_of.append(_tokens(model, p, first=(i == 0)))
            if not ids_of[-1]:
                raise InputError(f"splice part {i} is text {p!r} with no tokens; drop it or give it content")
        else:
            raise InputError(f"splice part {i} is {type(p).__name__}; expected a KVCache or a str")
    lengths = [len(p) if ids is None else len(ids) for p, ids in zip(parts, ids_of)]
    total = sum(lengths)
    limit = model.spec.max_positions
    if total > limit:
        raise PositionError(
            f"the spliced context has {total} tokens but {model.name} has positions 0..{limit - 1}; "
            "drop or shorten a part"
        )
    ref = next((p for p in parts if isinstance(p, KVCache)), None)
    spec = model.spec
    L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
    dtype = ref.keys.dtype if ref is not None else next(model.hf.parameters()).dtype
    device = model.device
    keys = torch.empty(L, 1, H, total, D, dtype=dtype, device=device)
    values = torch.empty(L, 1, H, total, spec.v_dim, dtype=dtype, device=device)
    token_ids = torch.empty(total, dtype=torch.int64)
    segments: list[str] = []
    starts = []
    cursor = 0
    inv = None
    for i, (part, ids, n) in enumerate(zip(parts, ids_of, lengths)):
        starts.append(cursor)
        label = labels[i] if labels is not None else None
        if ids is not None:  # text: prefill against everything placed so far
            run = model.run(torch.tensor([ids]), past=_view(keys, values, token_ids, cursor, model) if cursor else None,
                            logits="last")
            write_slots(keys, values, run, slice(cursor, None), slice(cursor, cursor + n))
            token_ids[cursor : cursor + n] = torch.tensor(ids)
            segments += [label or f"text{i}"] * n
        else:
            if part.keys.shape[1] != 1:
                raise InputError(f"splice part {i}: a cache of {part.keys.shape[1]} batch rows; splice works on batch-1 caches")
            if inv is None:
                inv, rotary_dim, pairing = part.rope_table()
                for s in part.rope:
                    s.check()
                check_positions(part.rope, torch.arange(total), "splice", model.spec.model_type)
            check_positions(part.rope, part.origin_positions, f"splice part {i}", model.spec.model_type)
            new_pos = torch.arange(cursor, cursor + n)
            rotate_keys(part.origin_keys, new_pos - part.origin_positions, inv, rotary_dim=rotary_dim,
                        pairing=pairing, dst=keys, src_index=torch.arange(n), dst_index=new_pos, backend=backend,
                        offset=rope_offset(part.rope))
            values[:, :, :, cursor : cursor + n] = part.values
            token_ids[cursor : cursor + n] = part.token_ids
            segments += [label] * n if label else list(part.segments)
            if seam and i > 0:
                k = min(seam, n)
                fix = model.run(part.token_ids[None, :k], past=_view(keys, values, token_ids, cursor, model),
                                logits="last")
                write_slots(keys, values, fix, slice(cursor, None), slice(cursor, cursor + k))
        cursor += n
    return KVCache(keys, values, torch.arange(total), token_ids, tuple(segments), dict(model.fingerprint),
                   _rope(model), limit)


def _rope(model):
    from .rope import layer_specs

    return layer_specs(model.spec)


def _view(keys, values, token_ids, n, model) -> KVCache:
    """The first ``n`` assembled slots as a KVCache (views, no copy)."""
    return KVCache(keys[..., :n, :], values[..., :n, :], torch.arange(n), token_ids[:n].clone(), ("",) * n,
                   dict(model.fingerprint), _rope(model), model.spec.max_positions)
