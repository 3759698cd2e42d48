"""Patching sweeps: layer x slot and layer x head grids of activation or KV patching, from text.

``patch_sweep(model, old, new, answers=(" granted", " denied"))`` patches NEW's activation
(or cache slot) into the OLD run one (layer, slot) cell at a time and returns a
:class:`Sweep`: the metric and the recovery ``(m - m_old) / (m_new - m_old)`` of every cell,
labelled with layers, absolute slots and tokens, with ``.figure()`` (plotly) and
``.to_json()``. At a head site (``site="attn.z"``) it patches one (layer, head) at a time and
returns a :class:`HeadSweep` (layers x heads). Both are :class:`Result` objects, as attribution's
estimates are. Cells run as batch rows of the one batched runner
(:func:`notekv.runner.run_variants`), and every sweep uses the exact shortcut that cells
before the first token where the prompts differ cannot change the metric.

``resid_patch_grid`` answers, for every layer ``l`` and position ``p``: what does the metric
read when the CLEAN run's residual stream entering layer ``l`` (``resid_pre``) at ``p``
replaces the CORRUPT run's? It is the grid of TransformerLens's
``get_act_patch_resid_pre``, computed with three exact shortcuts:

- before the first token where the prompts differ the two runs are identical, so a patch
  there writes the value already present: the cell is the unpatched metric (no forward);
- a patch at ``(l, p)`` leaves layers below ``l`` and positions before ``p`` untouched, so
  each cell runs only layers ``l..`` over positions ``p..`` (:func:`notekv.lean.forward_from`)
  reusing the corrupt run's K/V for the earlier slots;
- cells of one layer run as batch rows, in blocks of nearby positions sharing a start.

``method="hooks"`` computes every requested cell by hooked forwards instead (batch rows of
``block`` cells, no shortcuts): the plain batched sweep, and the path of families the lean
forward does not cover.
"""

from __future__ import annotations

import re
import warnings

from typing import Callable, Sequence

from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from .errors import InputError, InputTypeError, check_int
from .hooks.interventions import Patch
from .hooks.model import HookedModel
from .hooks.positions import PerRow, Pos, Selector, SlotError, TokenView, resolve
from .lean import forward_from, lean_support
from .runner import KVMix, RowInterventions, progress_bar, run_variants


def _slots_arg(slots, positions):
    """``slots=``, or the deprecated ``positions=`` (same meaning: indices in the prompt)."""
    if positions is None:
        return slots
    if slots is not None:
        raise InputError("slots/positions: pass slots= only (positions= is its deprecated name)")
    warnings.warn("positions= of the patching sweeps is now slots= (a position is a RoPE angle in notekv)",
                  DeprecationWarning, stacklevel=3)
    return positions


def int_list(name: str, values, *, low: int | None = None, high: int | None = None) -> list[int]:
    """``values`` (a list, tuple, range or 1-D integer tensor) as a list of ints, each checked
    by :func:`~notekv.errors.check_int`; a bare number or text is refused, not iterated."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.dim() > 1:
            raise InputError(f"{name}: a {values.dtype} tensor of shape {tuple(values.shape)}; pass whole numbers "
                             "as a list or a 1-D integer tensor")
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise InputTypeError(f"{name}={values!r}: pass a list of whole numbers (e.g. [0, 1])")
    return [check_int(f"{name}[{i}]", v, low=low, high=high) for i, v in enumerate(values)]


def token_id_arg(model: HookedModel, name: str, value) -> int:
    """``value`` as a token id of ``model``'s vocabulary (a whole number in 0..vocab-1)."""
    vocab = model.spec.vocab_size
    try:
        return check_int(name, value, low=0, high=vocab - 1)
    except InputError as err:
        raise type(err)(f"{err} (token ids of {model.name} lie in 0..{vocab - 1})") from None


def checked_metric(metric) -> Callable[[torch.Tensor], torch.Tensor]:
    """``metric`` wrapped so that a result that is not one number per row (a tensor ``[B]``
    for logits ``[B, vocab]``) is an :class:`InputError` naming it, not a failure deep in a
    sweep."""
    if not callable(metric):
        raise InputTypeError(f"metric={metric!r}: pass a function of last-token logits [batch, vocab] -> a tensor "
                             "[batch] (e.g. lambda lg: lg[:, good] - lg[:, bad])")

    def check(logits: torch.Tensor) -> torch.Tensor:
        out = metric(logits)
        rows = logits.shape[0]
        if not isinstance(out, torch.Tensor):
            raise InputError(f"metric returned a {type(out).__name__} ({out!r:.60}); it must return a tensor [batch] "
                             f"(one number per row of the logits [{rows}, vocab]), e.g. lg[:, good] - lg[:, bad]")
        if tuple(out.shape) != (rows,) or out.dtype == torch.bool or out.is_complex():
            raise InputError(f"metric returned a {out.dtype} tensor of shape {tuple(out.shape)} for logits of shape "
                             f"{tuple(logits.shape)}; it must return one real number per row, shape ({rows},), e.g. "
                             "lg[:, good] - lg[:, bad]")
        return out
    return check


def first_diff_of(a: Sequence[int], b: Sequence[int]) -> int:
    """The first position where two aligned prompts differ (their length if nowhere)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


@torch.no_grad()
def resid_patch_grid(model: HookedModel, corrupt: Sequence[int], clean: Sequence[int],
                     metric: Callable[[torch.Tensor], torch.Tensor], *, layers: Sequence[int] | None = None,
                     slots: Sequence[int] | None = None, block: int = 8, method: str = "auto",
                     progress: bool = True, positions: Sequence[int] | None = None) -> Float[torch.Tensor, "layers slots"]:
    """``[len(layers), len(slots)]`` metric values of patching ``clean``'s ``resid_pre``
    into the ``corrupt`` run, one (layer, slot) at a time.

    ``corrupt``/``clean``: token ids of equal length; ``metric``: last-token logits
    ``[B, vocab]`` -> ``[B]``; ``layers``/``slots`` (indices in the prompt): default all
    (``positions=`` is the deprecated name of ``slots=``); ``block``: slots per
    batched forward; ``method``: ``"lean"`` (the shortcuts), ``"hooks"`` (a hooked forward
    for every cell) or ``"auto"`` (lean where the family supports it).
    """
    positions = _slots_arg(slots, positions)
    if method not in ("auto", "lean", "hooks"):
        raise InputError(f"method={method!r}: choose 'auto', 'lean' or 'hooks'")
    block = check_int("block", block, low=1)
    metric = checked_metric(metric)
    reason = lean_support(model)
    if method == "lean" and reason:
        raise InputError(f"method='lean' cannot run {model.name}: {reason}; use method='hooks'")
    fast = method == "lean" or (method == "auto" and reason is None)
    corrupt, clean = int_list("corrupt", corrupt), int_list("clean", clean)
    if len(corrupt) != len(clean):
        raise InputError(f"corrupt/clean: prompts of {len(corrupt)} and {len(clean)} tokens; patching needs aligned prompts of equal token length")
    n, L = len(corrupt), model.spec.n_layers
    layers = list(range(L)) if layers is None else int_list("layers", layers)
    positions = list(range(n)) if positions is None else int_list("slots", positions)
    bad = [p for p in positions if not 0 <= p < n] + [l for l in layers if not 0 <= l < L]
    if bad:
        raise SlotError(f"layers/slots: {bad} out of range (the prompt has {n} tokens, the model {L} layers); "
                        "pass slots 0..n-1 and layers 0..L-1")
    sites = [f"L{l}.resid_pre" for l in sorted(set(layers))]
    run_c = model.run(torch.tensor([corrupt]), collect=sites, logits="last")
    run_k = model.run(torch.tensor([clean]), collect=sites, logits="last")
    base = float(metric(run_c.logits[:, -1].float())[0])
    d = first_diff_of(corrupt, clean) if fast else 0
    grid = torch.full((len(layers), len(positions)), base)
    live = sorted({p for p in positions if p >= d})
    blocks = [live[i : i + block] for i in range(0, len(live), block)]
    cache = run_c.kv if fast else None
    col = {p: [j for j, q in enumerate(positions) if q == p] for p in live}
    for i, l in enumerate(progress_bar(layers, progress=progress, desc="resid_pre grid")):
        old, new = run_c.acts[f"L{l}.resid_pre"], run_k.acts[f"L{l}.resid_pre"]
        for blk in blocks:
            start = blk[0] if fast else 0
            x = old[:, start:].expand(len(blk), -1, -1).clone()
            for r, p in enumerate(blk):
                x[r, p - start] = new[0, p]
            if fast:
                logits = forward_from(model, x, l, torch.arange(start, n), cache, past_slots=start)
            else:
                logits = _hooked(model, corrupt, l, x)
            vals = metric(logits.float())
            for r, p in enumerate(blk):
                grid[i, col[p]] = float(vals[r])
    return grid


def _hooked(model, ids: list[int], layer: int, resid: torch.Tensor) -> torch.Tensor:
    """The fallback: full forwards with layer ``layer``'s input replaced by ``resid`` (one
    source row per batch row)."""
    batch = torch.tensor([ids]).expand(resid.shape[0], -1)
    patch = Patch(f"L{layer}.resid_pre", resid)
    return model.run(batch, interventions=[patch], logits="last").logits[:, -1]


# ---------------------------------------------------------------------- the sweep from text
KV_SITES = ("kv", "kv.k", "kv.v")
ACT_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
#: Sites patched one (layer, head) per row: query heads for ``attn.z``/``attn.q``, KV heads
#: for ``attn.k``/``attn.v``. ``attn.z`` is the head's output (``attn_out`` is ``W_O`` of it).
HEAD_SITES = ("attn.z", "attn.q", "attn.k", "attn.v")
_ONE_HEAD = re.compile(r"^(attn\.[zqkv])\.h(\d+)$")


class Result:
    """What every patching result holds, exact or estimated: ``values`` (the metric with
    NEW's activation at each cell), ``m_old`` / ``m_new`` (the metric on OLD and on NEW),
    :attr:`recovery` ``(values - m_old) / (m_new - m_old)``, ``meta`` (``meta["method"]``:
    ``"exact"``, ``"attribution"`` or ``"graddrop"``), ``top(k)``, ``figure()`` (plotly,
    returned, not shown) and ``to_json()``. :class:`Sweep` (layer x slot) and
    :class:`HeadSweep` (layer x head) are its two kinds; :func:`patch_sweep`,
    :func:`~notekv.kv_attribution` and :func:`~notekv.attribute_acts` return them alike."""

    values: torch.Tensor
    m_old: float
    m_new: float
    meta: dict

    @property
    def method(self) -> str:
        """How the values were obtained: ``"exact"`` patching, ``"attribution"`` or ``"graddrop"``."""
        return self.meta.get("method", "exact")

    @property
    def recovery(self) -> torch.Tensor:
        swing = self.m_new - self.m_old
        if abs(swing) < 1e-9:
            raise InputError(f"the metric does not move between OLD ({self.m_old:.4g}) and NEW ({self.m_new:.4g}); "
                             "recovery is undefined. Pick prompts (or a metric) where the field matters")
        return (self.values - self.m_old) / swing


@dataclass
class Sweep(Result):
    """A layer x slot result: :func:`patch_sweep` at a residual, ``attn_out``/``mlp_out``,
    KV or one-head (``attn.z.h3``) site, :func:`~notekv.kv_attribution`, or one site of
    :func:`~notekv.attribute_acts`.

    ``values [len(layers), len(slots)]``: the metric with NEW's activation (or cache slot)
    at that cell; ``recovery``: ``(values - m_old) / (m_new - m_old)``; ``slots``: absolute
    slots (indices in the prompt); ``tokens``: their token strings (of OLD).
    """

    site: str
    layers: list[int]
    slots: list[int]
    tokens: list[str]
    values: Float[torch.Tensor, "layers slots"]
    m_old: float
    m_new: float
    meta: dict = field(default_factory=dict)

    @property
    def positions(self) -> list[int]:
        """Deprecated name of :attr:`slots`."""
        warnings.warn("Sweep.positions is Sweep.slots (a position is a RoPE angle in notekv)", DeprecationWarning,
                      stacklevel=2)
        return self.slots

    def top(self, k: int = 10) -> list[tuple[int, int, str, float]]:
        """The ``k`` cells of highest recovery: ``(layer, slot, token, recovery)``."""
        rec = self.recovery
        flat = rec.flatten().argsort(descending=True)[:k].tolist()
        w = rec.shape[1]
        return [(self.layers[i // w], self.slots[i % w], self.tokens[i % w], float(rec.flatten()[i])) for i in flat]

    def figure(self, title: str | None = None):
        """A plotly heatmap of recovery, layers x slots labelled ``slot:token``."""
        import plotly.graph_objects as go

        labels = [f"{p}:{t!r}" for p, t in zip(self.slots, self.tokens)]
        z = [[round(float(v), 3) for v in row] for row in self.recovery]
        fig = go.Figure(go.Heatmap(z=z, x=labels, y=self.layers, colorscale="RdBu_r", zmid=0,
                                   colorbar={"title": "recovery"}))
        how = "attribution estimate" if self.method != "exact" else "patching"
        fig.update_layout(title=title or f"{self.site} {how}, NEW into OLD, one cell at a time",
                          xaxis_title="slot (absolute: token)", yaxis_title="layer", height=520)
        return fig

    def to_json(self) -> dict:
        return {"site": self.site, "layers": self.layers, "slots": self.slots, "tokens": self.tokens,
                "values": self.values.tolist(), "recovery": self.recovery.tolist(), "m_old": self.m_old,
                "m_new": self.m_new, **self.meta}


@dataclass
class HeadSweep(Result):
    """A layer x head result: :func:`patch_sweep` at a head site (``attn.z``, ``attn.q``:
    query heads; ``attn.k``, ``attn.v``: KV heads), one (layer, head) patched per batch row
    at the same ``slots`` in every row, or the same question estimated by
    :func:`~notekv.attribute_acts`.

    ``values [len(layers), len(heads)]``: the metric with NEW's activation of that head at
    every slot of ``slots`` (absolute; ``tokens``: their token strings of OLD);
    ``recovery``: ``(values - m_old) / (m_new - m_old)``. ``figure()`` is TransformerLens's
    head heatmap (layers down, heads across, RdBu centred on 0).
    """

    site: str
    layers: list[int]
    heads: list[int]
    slots: list[int]
    tokens: list[str]
    values: Float[torch.Tensor, "layers heads"]
    m_old: float
    m_new: float
    meta: dict = field(default_factory=dict)

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads of highest recovery: ``(layer, head, recovery)``."""
        rec = self.recovery
        flat = rec.flatten().argsort(descending=True)[:k].tolist()
        w = rec.shape[1]
        return [(self.layers[i // w], self.heads[i % w], float(rec.flatten()[i])) for i in flat]

    def figure(self, title: str | None = None):
        """A plotly heatmap of recovery, layers (down) x heads (across), RdBu centred on 0."""
        import plotly.graph_objects as go

        z = [[round(float(v), 3) for v in row] for row in self.recovery]
        kind = "KV head" if self.site in ("attn.k", "attn.v") else "head"
        fig = go.Figure(go.Heatmap(z=z, x=self.heads, y=self.layers, colorscale="RdBu", zmid=0,
                                   colorbar={"title": "recovery"},
                                   hovertemplate=f"layer %{{y}}, {kind} %{{x}}: %{{z}}<extra></extra>"))
        how = "attribution estimate" if self.method != "exact" else "patching"
        fig.update_layout(title=title or f"{self.site} {how} per {kind}, NEW into OLD at {_slots_text(self)}",
                          xaxis_title=kind, yaxis_title="layer", height=520,
                          xaxis={"tickmode": "array", "tickvals": self.heads},
                          yaxis={"autorange": "reversed", "tickmode": "array", "tickvals": self.layers})
        return fig

    def to_json(self) -> dict:
        return {"site": self.site, "layers": self.layers, "heads": self.heads, "slots": self.slots,
                "tokens": self.tokens, "values": self.values.tolist(), "recovery": self.recovery.tolist(),
                "m_old": self.m_old, "m_new": self.m_new, **self.meta}


def _slots_text(r: HeadSweep) -> str:
    s = r.slots
    if not s:
        return "no slot"
    if len(s) == 1:
        return f"slot {s[0]} ({r.tokens[0]!r})"
    if s == list(range(s[0], s[-1] + 1)):
        return f"slots {s[0]}..{s[-1]}"
    return f"{len(s)} slots"


def _ids_of(model: HookedModel, x, what: str) -> tuple[list[int], TokenView | None]:
    if isinstance(x, (str, TokenView)):
        view = model.tokenize(x) if isinstance(x, str) else x
        return list(view.ids), view
    if isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] != 1:
        raise InputError(f"{what}: a tensor of shape {tuple(x.shape)}; pass one prompt (ids [S] or [1, S])")
    try:
        raw = x if isinstance(x, (list, tuple, torch.Tensor)) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(f"{what}={x!r:.60}: give text, a TokenView or token ids") from None
    ids = int_list(what, raw.reshape(-1) if isinstance(raw, torch.Tensor) else raw)
    if not ids:
        raise InputError(f"{what} is empty: give text, a TokenView or token ids")
    return ids, None


def answer_ids(model: HookedModel, answers) -> tuple[int, int]:
    """The token ids ``(good, bad)`` of ``answers``: notekv's one rule for answer words.

    Ids are taken as they are. Words are tokenized (no special tokens) and read at the first
    token where their tokenizations differ: for single-token words (what a decision step on a
    real model should use) that is the words' own ids. Words that tokenize identically, or one
    a prefix of the other, are refused.
    """
    try:
        good, bad = answers
    except (TypeError, ValueError):
        raise InputError(f"answers={answers!r}: give two answers (good, bad), as words or token ids") from None
    if not isinstance(good, str) or not isinstance(bad, str):
        g, b = token_id_arg(model, "answers[0]", good), token_id_arg(model, "answers[1]", bad)
        if g == b:
            raise InputError(f"answers={answers!r}: good and bad are the same token id {g}, so "
                             "logit[good] - logit[bad] is 0 whatever the prompt; give two different answers")
        return g, b
    if not good.strip() or not bad.strip():
        raise InputError(f"answers={answers!r}: an answer word is empty or blank; give two words")
    a = model.tokenizer(good, add_special_tokens=False)["input_ids"]
    b = model.tokenizer(bad, add_special_tokens=False)["input_ids"]
    for x, y in zip(a, b):
        if x != y:
            return int(x), int(y)
    raise InputError(f"answers={answers!r}: the words tokenize identically (or one is a prefix of the other) on "
                     f"{model.name}; use two words whose tokens differ")


def _answer_metric(model: HookedModel, answers) -> Callable[[torch.Tensor], torch.Tensor]:
    g, b = answer_ids(model, answers)
    return lambda logits: logits[:, g] - logits[:, b]


def _slot_arg(slots, ids: list[int], view: TokenView | None, limit: int) -> list[int] | None:
    """``slots=`` as absolute slots: None stays None; a selector (``Last()``, ``Span(...)``,
    ``Range(a)``...) resolves against OLD's tokens; anything else is a list of whole numbers."""
    if slots is None:
        return None
    if isinstance(slots, Selector):
        if isinstance(slots, PerRow):
            raise InputError(f"slots={slots!r}: a sweep takes one slot set (PerRow gives each batch row its own); "
                             "pass a selector such as nk.Last() or a list of slots")
        got = resolve(slots, view, len(ids))
        return list(range(limit)) if got is None else list(got)
    return int_list("slots", slots)


def _head_site(model: HookedModel, site: str) -> tuple[str, int | None] | None:
    """``(head site, head)`` for ``attn.z`` (head None: every head) or ``attn.z.h3``; None
    for sites without a head axis. A head index past the model's heads is refused."""
    if site in HEAD_SITES:
        return site, None
    m = _ONE_HEAD.match(site)
    if m is None:
        return None
    base, head = m.group(1), int(m.group(2))
    n = _n_heads(model, base)
    if head >= n:
        raise InputError(f"site={site!r}: {model.name} has {n} {'KV ' if base in ('attn.k', 'attn.v') else ''}heads "
                         f"at {base}; pass {base}.h0..{base}.h{n - 1}")
    return base, head


def _n_heads(model: HookedModel, site: str) -> int:
    return model.spec.n_kv_heads if site in ("attn.k", "attn.v") else model.spec.n_heads


@torch.no_grad()
def patch_sweep(model: HookedModel, old, new, *, answers=None, metric=None, site: str = "resid_pre",
                layers: Sequence[int] | None = None, slots=None,
                block: int = 16, method: str = "auto", progress: bool = True,
                positions: Sequence[int] | None = None) -> "Sweep | HeadSweep":
    """Patch NEW into OLD one cell at a time and measure the decision.

    ``old`` / ``new``: aligned prompts (text, TokenView or ids of equal length). The metric is
    read at the last token: ``answers=(good, bad)`` (words or ids: ``logit[good] -
    logit[bad]``) or ``metric(logits [B, vocab]) -> [B]``.

    ``site`` and what comes back:

    - an activation site (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
      ``mlp_out``), ``"kv"`` / ``"kv.k"`` / ``"kv.v"`` (NEW's cached K and/or V at (layer,
      slot) before the last token is decoded; ``slots`` then run over the slots before it)
      or one head of a head site (``"attn.z.h3"``): a :class:`Sweep`, one (layer, slot) per
      cell; ``slots`` are its columns (default all);
    - a head site, ``"attn.z"`` (each head's output, TransformerLens's ``hook_z``),
      ``"attn.q"``, ``"attn.k"`` or ``"attn.v"`` (``k``/``v``: KV heads): a
      :class:`HeadSweep`, one (layer, head) per cell, patched at every slot of ``slots``
      together. Default: every slot from the first token where the prompts differ to the
      last, which is TransformerLens's all-positions head patching (the slots before it hold
      the same values in both runs); ``slots=nk.Last()``: the heads' output at the decision
      token only.

    ``layers`` default to all; ``slots``: absolute slots (a list or range) or a selector
    resolved on OLD (``nk.Last()``, ``nk.Span("status: delivered")``, ``nk.Range(-5)``);
    ``positions=`` is the deprecated name of ``slots=``. ``block``: cells per batched forward
    (fewer on a long prompt: each row copies the shared cache, so rows are bounded by
    ``KVCache.rows_within``, 1 GiB of K/V by default). ``method`` applies to ``resid_pre``:
    ``"lean"`` (exact shortcuts), ``"hooks"`` or ``"auto"``. ``progress``: a progress bar,
    drawn only on a terminal. Every cell runs as a batch row of
    :func:`notekv.runner.run_variants` (``resid_pre``: :func:`resid_patch_grid`).
    """
    positions = _slots_arg(slots, positions)
    if (answers is None) == (metric is None):
        raise InputError("answers/metric: pass exactly one of answers=(good, bad) or metric=fn(logits) -> [batch]")
    metric = _answer_metric(model, answers) if answers is not None else checked_metric(metric)
    if not isinstance(site, str):
        raise InputTypeError(f"site={site!r}: pass a site name such as 'resid_pre' or 'attn.z'")
    head_site = _head_site(model, site)
    if site not in ACT_SITES + KV_SITES and head_site is None:
        raise InputError(f"site={site!r}: choose a layer x slot site ({', '.join(ACT_SITES + KV_SITES)}, or one "
                         f"head such as 'attn.z.h0') or a layer x head site ({', '.join(HEAD_SITES)})")
    block = check_int("block", block, low=1)
    o_ids, o_view = _ids_of(model, old, "old")
    n_ids, _ = _ids_of(model, new, "new")
    if len(o_ids) != len(n_ids):
        raise InputError(f"old has {len(o_ids)} tokens and new {len(n_ids)}: a sweep needs aligned prompts of "
                         "equal token length (change a value of the same token count)")
    n, L = len(o_ids), model.spec.n_layers
    kv = site in KV_SITES
    limit = n - 1 if kv else n
    d = first_diff_of(o_ids, n_ids)
    per_head = head_site is not None and head_site[1] is None
    layers = list(range(L)) if layers is None else int_list("layers", layers)
    positions = _slot_arg(positions, o_ids, o_view, limit)
    if positions is None:
        positions = list(range(d, n) if per_head else range(limit))
    bad = [p for p in positions if not 0 <= p < limit]
    if bad:
        raise SlotError(f"slots: slot {bad[0]} is outside 0..{limit - 1} "
                        f"({'the cached slots before the decision token' if kv else 'the prompt'})")
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise SlotError(f"layers: {bad[0]} is outside 0..{L - 1} ({model.name} has {L} layers)")
    m_old = float(metric(model.run(torch.tensor([o_ids]), logits="last").logits[:, -1].float())[0])
    m_new = float(metric(model.run(torch.tensor([n_ids]), logits="last").logits[:, -1].float())[0])
    tokens = list(o_view.tokens) if o_view is not None else [model.tokenizer.decode([t]) for t in o_ids]
    meta = {"model": model.name, "first_diff": d, "method": "exact"}
    if per_head:
        positions = sorted(set(positions))
        heads = list(range(_n_heads(model, site)))
        values = _head_sweep(model, o_ids, n_ids, metric, site, layers, heads, positions, block, progress, m_old)
        return HeadSweep(site, layers, heads, positions, [tokens[p] for p in positions], values, m_old, m_new, meta)
    if site == "resid_pre":
        values = resid_patch_grid(model, o_ids, n_ids, metric, layers=layers, slots=positions, block=block,
                                  method=method, progress=progress)
    else:
        values = _cell_sweep(model, o_ids, n_ids, metric, site, layers, positions, block, progress, m_old)
    return Sweep(site, layers, positions, [tokens[p] for p in positions], values, m_old, m_new, meta)


def _tail_runs(model, o_ids, n_ids, sites: list[str]):
    """``(d, past, clean)``: the first differing slot, the shared prefix's cache (None when
    the prompts differ from the first token) and NEW's tail run after it, collecting
    ``sites``. Every patch from slot ``d`` on runs over that one shared past."""
    d = first_diff_of(o_ids, n_ids)
    past = model.run(torch.tensor([o_ids[:d]]), logits="last").kv if d else None
    clean = model.run(torch.tensor([n_ids[d:]]), past=past, collect=sites, logits="last")
    return d, past, clean


def _head_sweep(model, o_ids, n_ids, metric, site, layers, heads, slots, block, progress, m_old) -> torch.Tensor:
    """``[len(layers), len(heads)]``: one row of :func:`notekv.runner.run_variants` per
    (layer, head), patching that head of ``site`` at every live slot of ``slots``."""
    grid = torch.full((len(layers), len(heads)), m_old)
    d = first_diff_of(o_ids, n_ids)
    live = [p for p in slots if p >= d]  # before d both runs hold the same values: the patch changes nothing
    if not live or d == len(o_ids):
        return grid
    _, past, clean = _tail_runs(model, o_ids, n_ids, [f"L{l}.{site}" for l in sorted(set(layers))])
    start = live[0]  # the rows are OLD up to their first patched slot: they share OLD's cache of it
    if start > d:
        past = model.run(torch.tensor([o_ids[:start]]), logits="last").kv
    cells = [(i, j) for i in range(len(layers)) for j in range(len(heads))]

    def patches(part: range):
        chunk = [cells[r] for r in part]
        return [Patch(f"L{layers[i]}.{site}.h{heads[j]}", clean,
                      at=PerRow([Pos(live) if r == k else Pos() for r in range(len(chunk))]))
                for k, (i, j) in enumerate(chunk)]
    vals = run_variants(model, o_ids[start:], RowInterventions(len(cells), patches), metric, past=past, most=block,
                        progress=progress, desc=f"{site} per head")
    for r, (i, j) in enumerate(cells):
        grid[i, j] = float(vals[r])
    return grid


def _cell_sweep(model, o_ids, n_ids, metric, site, layers, positions, block, progress, m_old) -> torch.Tensor:
    """Every live cell as one row of the batched runner (:func:`notekv.runner.run_variants`)."""
    d = first_diff_of(o_ids, n_ids)
    grid = torch.full((len(layers), len(positions)), m_old)
    cells = [(i, j) for i in range(len(layers)) for j, p in enumerate(positions) if p >= d]
    if not cells:
        return grid
    desc = f"{site} sweep"
    if site in KV_SITES:  # decode the last token against OLD's cache with NEW's slots at the cell
        old_c = model.run(torch.tensor([o_ids[:-1]]), logits="last").kv
        new_c = model.run(torch.tensor([n_ids[:-1]]), logits="last").kv
        which = "kv" if site == "kv" else site[-1]
        mix = KVMix.of_cells(new_c, [(layers[i], positions[j], None) for i, j in cells], which=which)
        vals = run_variants(model, [o_ids[-1]], mix, metric, past=old_c, most=block, progress=progress, desc=desc)
    else:  # the tail from the first difference, after the shared prefix's cache
        one = _ONE_HEAD.match(site)
        whole = one.group(1) if one else site  # a head's patch reads the whole site's collection
        _, past, clean = _tail_runs(model, o_ids, n_ids, [f"L{l}.{whole}" for l in sorted(set(layers))])

        def patches(part: range):
            chunk = [cells[r] for r in part]
            return [Patch(f"L{layers[li]}.{site}", clean,
                          at=PerRow([Pos(positions[j]) if i == li else Pos() for i, j in chunk]))
                    for li in sorted({i for i, _ in chunk})]
        vals = run_variants(model, o_ids[d:], RowInterventions(len(cells), patches), metric, past=past, most=block,
                            progress=progress, desc=desc)
    for r, (i, j) in enumerate(cells):
        grid[i, j] = float(vals[r])
    return grid
