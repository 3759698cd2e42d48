"""The one batched runner behind every exact patching computation.

A patching experiment is a set of *variants*: batch rows that run the same tokens over the
same shared past (a :class:`~notekv.KVCache`, or none), each row changed by its own
interventions, scored by one metric of the last token's logits. :func:`run_variants` takes
the variants and the metric and owns everything else: packing rows into batched forwards,
bounding each forward's rows by a byte budget (every row materialises a copy of the shared
past when its tokens are appended), and choosing the fastest exact path.

Two kinds of variants cover every sweep, battery and check in notekv and the report:

- :class:`KVMix`: row ``b`` is the base cache with ``source``'s keys and/or values at the
  cells ``keys[b]`` / ``values[b]`` (``[L, H_kv, S]`` boolean masks). On families the lean
  forward covers, with no other interventions, the rows run through the lean layer loop,
  which mixes each layer's K/V only when that layer runs (one layer's copies at a time, not
  a whole cache per row); elsewhere they compile to :class:`~notekv.KVPatch` interventions
  with per-row slots and run through the plan like any other intervention.
- :class:`RowInterventions`: any per-row interventions, built for each chunk of rows by a
  function (activation, head and direction patching).

Both paths are exact: they compute the same numbers as one hooked forward per row, within
float rounding of a batched matmul (checked against plain transformers in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from .errors import InputError, check_int
from .hooks.interventions import Intervention, KVPatch
from .hooks.positions import PerRow, Pos
from .kv import KVCache
from .model.attnmath import visible

Metric = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("auto", "lean", "hooks")


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A tqdm bar over ``iterable`` that is drawn only when asked (``progress``) and only on a
    terminal: when stderr is a file or a pipe (logs, CI, captured output) nothing is written,
    so logs hold no carriage returns or escape codes. ``kwargs`` go to tqdm (``desc``,
    ``total``, ``leave``...)."""
    return tqdm(iterable, disable=None if progress else True, **kwargs)


@dataclass(frozen=True, eq=False)
class KVMix:
    """``n`` rows of mixed caches: row ``b`` takes ``source``'s key at ``(layer, kv head,
    slot)`` where its key mask is True and its value where its value mask is, the base
    cache's elsewhere. ``masks(rows)`` gives the boolean masks ``([b, L, H_kv, S], [b, L,
    H_kv, S])`` of a chunk of rows (built per chunk, so memory never scales with ``n``).
    Build with :meth:`of_slots` or :meth:`of_cells`."""

    source: KVCache
    n: int
    masks: Callable[[range], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of_slots(cls, source: KVCache, masks: Bool[torch.Tensor, "rows layers slots"], which: str = "kv") -> "KVMix":
        """Rows from ``[rows, L, S]`` masks over (layer, slot), every KV head; ``which``: the
        rows take ``"k"``, ``"v"`` or both (``"kv"``)."""
        _check_which(which)
        L, _, H, S, _ = source.keys.shape
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (L, S):
            raise InputError(f"masks: expected [rows, {L}, {S}] (rows, layers, slots of the source), "
                             f"got {tuple(masks.shape)}")
        masks = masks.to(torch.bool)

        def of(rows: range):
            full = masks[rows.start : rows.stop, :, None, :].expand(-1, -1, H, -1)
            return _pick(full, which)
        return cls(source, masks.shape[0], of)

    @classmethod
    def of_cells(cls, source: KVCache, cells: Sequence[tuple], which: str = "kv") -> "KVMix":
        """One row per cell ``(layer | None, slot, kv_head | None)`` (None: every layer / head)."""
        _check_which(which)
        L, _, H, S, _ = source.keys.shape
        cells = [tuple(c) for c in cells]

        def of(rows: range):
            m = torch.zeros(len(rows), L, H, S, dtype=torch.bool)
            for r, (layer, slot, head) in enumerate(cells[rows.start : rows.stop]):
                m[r, slice(None) if layer is None else layer, slice(None) if head is None else head, slot] = True
            return _pick(m, which)
        return cls(source, len(cells), of)

    def interventions(self, rows: range) -> list[Intervention]:
        """The rows ``rows`` as :class:`~notekv.KVPatch` interventions with per-row slots (the
        hooked path): one per (K/V, layer, head group) that any of the rows patches."""
        km, vm = self.masks(rows)
        parts = [("kv", km)] if torch.equal(km, vm) else [("k", km), ("v", vm)]
        out: list[Intervention] = []
        for which, m in parts:
            for layer in range(m.shape[1]):
                ml = m[:, layer]  # [b, H, S]
                if not bool(ml.any()):
                    continue
                uniform = bool((ml == ml[:, :1]).all())
                groups = [(None, ml[:, 0])] if uniform else [((h,), ml[:, h]) for h in range(ml.shape[1])]
                for heads, sm in groups:
                    if not bool(sm.any()):
                        continue
                    at = PerRow([Pos(torch.nonzero(r).flatten().tolist()) if bool(r.any()) else Pos() for r in sm])
                    out.append(KVPatch(self.source, at=at, layers=[layer], heads=heads, which=which))
        return out


def _check_which(which: str) -> None:
    if which not in ("k", "v", "kv"):
        raise InputError(f"which={which!r}: choose 'k', 'v' or 'kv'")


def _pick(mask: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    none = torch.zeros((), dtype=torch.bool).expand(mask.shape)
    return (mask if "k" in which else none), (mask if "v" in which else none)


@dataclass(frozen=True, eq=False)
class RowInterventions:
    """``n`` rows whose interventions ``build(rows)`` gives for each chunk ``rows`` (a range of
    row indices; per-row selectors and sources in it are indexed ``0..len(rows)-1``)."""

    n: int
    build: Callable[[range], Sequence[Intervention]]

    def interventions(self, rows: range) -> list[Intervention]:
        return list(self.build(rows))


def logit_diff(good: int, bad: int) -> Metric:
    """The metric ``logit[good] - logit[bad]`` of last-token logits ``[B, vocab]``."""
    return lambda logits: logits[:, good] - logits[:, bad]


def rows_per_step(past: KVCache | None, budget: int | None = None, most: int | None = None, *,
                  per_layer: bool = False) -> int:
    """Rows of one batched forward over ``past``: ``budget`` bytes (default
    ``notekv.kv.cache.KV_BUDGET``) of per-row copies of it, at least 1 and at most ``most``.
    ``per_layer``: the rows copy one layer at a time (the lean path), not the whole cache."""
    if past is None:
        rows = most or 64
    elif per_layer:  # a layer's mixed copy and its appended copy, one layer at a time
        from .kv import cache as kv_cache

        budget = kv_cache.KV_BUDGET if budget is None else check_int("budget", budget, low=1)
        rows = max(1, budget // max(1, 2 * past.row_bytes // past.n_layers))
    else:
        rows = past.rows_within(budget)
    return rows if most is None else max(1, min(most, rows))


@torch.no_grad()
def run_variants(model, tokens, variants: "KVMix | RowInterventions", metric: Metric, *,
                 past: KVCache | None = None, shared: Sequence[Intervention] = (), budget: int | None = None,
                 most: int | None = None, method: str = "auto", progress: bool = False,
                 desc: str = "patching") -> Float[torch.Tensor, "rows"]:
    """``[variants.n]`` float64 (CPU): ``metric`` of the last token's logits for every row.

    ``tokens``: the ids every row runs (``[S]``, a list or tensor), after ``past`` (a
    KVCache of batch 1 shared by every row, or None). ``variants``: :class:`KVMix` (whose base
    cache is ``past``) or :class:`RowInterventions`. ``metric``: float32 logits ``[B, vocab]``
    -> ``[B]``. ``shared``: interventions applied to every row (a Knockout...). ``budget``:
    bytes of per-row cache copies one forward may hold; ``most``: rows per forward at most.
    ``method``: ``"lean"`` (KVMix rows through the lean layer loop; refused where it does not
    apply), ``"hooks"`` (the plan) or ``"auto"`` (lean where it applies and the model runs in
    float32; in bf16/fp16 the hooked path, whose rounding is the model's own kernels').
    ``progress``: a progress bar over the forwards, drawn only on a terminal.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: choose one of {METHODS}")
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise InputError("tokens: no tokens to run; give at least the decision token")
    if past is not None:
        past.check_model(model)
        if past.keys.shape[1] != 1:
            raise InputError(f"past: a shared past must be a batch-1 cache, got {past.keys.shape[1]} rows")
    if most is not None:
        check_int("most", most, low=1)
    lean_reason = _lean_reason(model, variants, past, shared)
    if method == "lean" and lean_reason:
        raise InputError(f"method='lean' cannot run these variants on {model.name}: {lean_reason}; use method='hooks'")
    # In half precision the lean loop's rounding differs from the model's own kernels: "auto"
    # keeps the model's computation there, and "lean" is the caller's explicit choice.
    lean = (method == "lean" or (method == "auto" and model.dtype in (torch.float32, torch.float64))) \
        and lean_reason is None
    n = variants.n
    step = rows_per_step(past, budget, most, per_layer=lean)
    out = torch.empty(n, dtype=torch.float64)
    for start in progress_bar(range(0, n, step), progress=progress, desc=desc, leave=False):
        rows = range(start, min(start + step, n))
        if lean:
            logits = _lean_rows(model, ids, past, variants, rows)
        else:
            batch = None if past is None else past.expand(len(rows))
            ivs = list(shared) + variants.interventions(rows)
            # the Run (and the cache it appended into) is dropped at once: one chunk's copies at a time
            logits = model.run(ids[None].expand(len(rows), -1), past=batch, interventions=ivs,
                               logits="last").logits[:, -1].float()
        out[rows.start : rows.stop] = metric(logits).double().cpu()
    return out


def _lean_reason(model, variants, past: KVCache | None, shared) -> str | None:
    """Why the lean path cannot run these variants (None when it can)."""
    from .lean import lean_support

    if not isinstance(variants, KVMix):
        return "only KV-mix rows run on the lean path"
    if shared:
        return "shared interventions need the hooked path"
    if past is None:
        return "a KV mix needs the base cache as past"
    reason = lean_support(model)
    if reason:
        return reason
    if not torch.equal(past.positions, torch.arange(len(past))):
        return "the base cache's keys are not at their slots' positions (a repositioned cache)"
    if variants.source.keys.shape != past.keys.shape:
        return "the source cache does not have the base cache's shape"
    return None


def _lean_rows(model, ids: torch.Tensor, past: KVCache, mix: KVMix, rows: range) -> torch.Tensor:
    """Float32 last-token logits ``[len(rows), vocab]`` of ``ids`` after each row's mixed cache,
    through the lean layer loop. At each layer the rows that patch nothing there share the base
    cache's K/V (their queries are folded into one matmul against it); only the rows that patch
    that layer get a mixed copy of it."""
    from .lean.forward import decoder_layers, layer_refs, rope_tables, unembed_logits
    from .model.arch import get_submodule

    spec, lay = model.spec, model.spec.layout
    dev = model.device
    dtype = next(model.hf.parameters()).dtype
    b, s, n_past = len(rows), ids.numel(), len(past)
    km, vm = (m.to(dev) for m in mix.masks(rows))
    qpos = torch.arange(n_past, n_past + s, device=dev)
    tables = rope_tables(spec, qpos.cpu(), dtype, dev)
    refs = layer_refs(model)
    group = spec.n_heads // spec.n_kv_heads
    see_past = {}  # window -> bool [s, S] (keys at slots 0..S-1 are at their slots' positions)

    def attention(l: int, r, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if r.window not in see_past:
            see_past[r.window] = (visible(qpos, torch.arange(n_past, device=dev), r.window),
                                  visible(qpos, qpos, r.window))
        touched = torch.nonzero(km[:, l].flatten(1).any(1) | vm[:, l].flatten(1).any(1)).flatten()
        return _shared_past_attention(q, k, v, past.keys[l].to(dev, dtype), past.values[l].to(dev, dtype),
                                      mix.source.keys[l].to(dev, dtype), mix.source.values[l].to(dev, dtype),
                                      km[:, l], vm[:, l], touched, *see_past[r.window], r.scaling)

    x = get_submodule(model.hf, lay.embed).forward(ids[None].expand(b, -1).to(dev))
    x = decoder_layers(refs, x, range(spec.n_layers), tables, None, qpos, qpos, group, n_heads=spec.n_heads,
                       n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, attention=attention)
    final_norm, unembed = get_submodule(model.hf, lay.final_norm), get_submodule(model.hf, lay.unembed)
    return unembed_logits(final_norm, unembed, x, "last", spec.final_logit_softcap)


def _shared_past_attention(q, k, v, base_k, base_v, src_k, src_v, km, vm, touched, see_past, see_new,
                           scaling: float) -> torch.Tensor:
    """Attention of ``q [b, H, s, D]`` over a past of ``S`` slots followed by the rows' own
    new ``k``/``v [b, H_kv, s, D]``, in float32, returned ``[b, s, H * D]`` in ``q``'s dtype.

    Row ``r``'s past is ``base`` with ``src`` where its masks ``km``/``vm [b, H_kv, S]`` say;
    only the ``touched`` rows have any such cell, so every row first reads the shared base
    (queries of all rows folded into one matmul per KV head) and the touched rows are then
    recomputed against their own mixed past. The two key blocks are joined in one softmax
    (a shared max and normaliser); ``see_past [s, S]`` / ``see_new [s, s]`` are the
    visibility masks (causal, sliding window)."""
    b, n_heads, s, d = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    qf = q.float().reshape(b, n_kv, g * s, d)  # query head kv*g + i reads KV head kv
    neg = torch.finfo(torch.float32).min
    # scores against the shared past: [n_kv, b * g * s, S] -> [b, n_kv, g * s, S]
    folded = qf.transpose(0, 1).reshape(n_kv, b * g * s, d)
    past = torch.matmul(folded, base_k[0].float().transpose(-1, -2)) * scaling
    past = past.reshape(n_kv, b, g * s, -1).transpose(0, 1).contiguous()
    if len(touched):
        mixed_k = torch.where(km[touched][..., None], src_k[0], base_k[0]).float()  # [t, n_kv, S, D]
        past[touched] = torch.matmul(qf[touched], mixed_k.transpose(-1, -2)) * scaling
    own = torch.matmul(qf, k.float().transpose(-1, -2)) * scaling  # [b, n_kv, g * s, s]
    past = past.masked_fill(~see_past.repeat(g, 1), neg)
    own = own.masked_fill(~see_new.repeat(g, 1), neg)
    top = torch.maximum(past.amax(-1, keepdim=True), own.amax(-1, keepdim=True))
    wp, wn = (past - top).exp(), (own - top).exp()
    norm = wp.sum(-1, keepdim=True) + wn.sum(-1, keepdim=True)
    out = torch.matmul(wp.transpose(0, 1).reshape(n_kv, b * g * s, -1), base_v[0].float())
    out = out.reshape(n_kv, b, g * s, -1).transpose(0, 1).contiguous()
    if len(touched):
        mixed_v = torch.where(vm[touched][..., None], src_v[0], base_v[0]).float()
        out[touched] = torch.matmul(wp[touched], mixed_v)
    out = (out + torch.matmul(wn, v.float())) / norm  # [b, n_kv, g * s, Dv]
    dv = out.shape[-1]
    return out.reshape(b, n_heads, s, dv).transpose(1, 2).reshape(b, s, n_heads * dv).to(q.dtype)


__all__ = ["KVMix", "METHODS", "Metric", "RowInterventions", "logit_diff", "progress_bar", "rows_per_step",
           "run_variants"]
