"""Patching sweeps: layer x position grids of activation or KV patching, from text.

``patch_sweep(model, old, new, answers=(" granted", " denied"))`` patches NEW's activation
(or cache slot) into the OLD run one (layer, position) cell at a time and returns a
:class:`Sweep`: the metric and the recovery ``(m - m_old) / (m_new - m_old)`` of every cell,
labelled with layers, absolute positions and tokens, with ``.figure()`` (plotly) and
``.to_json()``. Cells run as batch rows of one forward (per-row interventions,
:class:`~notekv.PerRow`), and every sweep uses the exact shortcut that cells before the
first token where the prompts differ cannot change the metric.

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

import warnings

from typing import Callable, Sequence

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .errors import InputError, check_int
from .hooks.interventions import Patch
from .hooks.model import HookedModel
from .hooks.positions import PerRow, Pos, SlotError, TokenView
from .lean import forward_from, lean_support
from .runner import KVMix, RowInterventions, run_variants


def _slots_arg(slots, positions):
    """``slots=``, or the deprecated ``positions=`` (same meaning: indices in the prompt)."""
    if positions is None:
        return slots
    if slots is not None:
        raise InputError("slots/positions: pass slots= only (positions= is its deprecated name)")
    warnings.warn("positions= of the patching sweeps is now slots= (a position is a RoPE angle in notekv)",
                  DeprecationWarning, stacklevel=3)
    return positions


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
    reason = lean_support(model)
    if method == "lean" and reason:
        raise InputError(f"method='lean' cannot run {model.name}: {reason}; use method='hooks'")
    fast = method == "lean" or (method == "auto" and reason is None)
    corrupt, clean = [int(t) for t in corrupt], [int(t) for t in clean]
    if len(corrupt) != len(clean):
        raise InputError(f"corrupt/clean: prompts of {len(corrupt)} and {len(clean)} tokens; patching needs aligned prompts of equal token length")
    n, L = len(corrupt), model.spec.n_layers
    layers = list(range(L)) if layers is None else list(layers)
    positions = list(range(n)) if positions is None else list(positions)
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
    for i, l in enumerate(tqdm(layers, desc="resid_pre grid", disable=not progress)):
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


@dataclass
class Sweep:
    """The result of :func:`patch_sweep`.

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

    @property
    def recovery(self) -> torch.Tensor:
        swing = self.m_new - self.m_old
        if abs(swing) < 1e-9:
            raise InputError(f"the metric does not move between OLD ({self.m_old:.4g}) and NEW ({self.m_new:.4g}); "
                             "recovery is undefined. Pick prompts (or a metric) where the field matters")
        return (self.values - self.m_old) / swing

    def top(self, k: int = 10) -> list[tuple[int, int, str, float]]:
        """The ``k`` cells of highest recovery: ``(layer, position, token, recovery)``."""
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
        fig.update_layout(title=title or f"{self.site} patching, NEW into OLD, one cell at a time",
                          xaxis_title="slot (absolute: token)", yaxis_title="layer", height=520)
        return fig

    def to_json(self) -> dict:
        return {"site": self.site, "layers": self.layers, "slots": self.slots, "tokens": self.tokens,
                "values": self.values.tolist(), "recovery": self.recovery.tolist(), "m_old": self.m_old,
                "m_new": self.m_new, **self.meta}


def _ids_of(model: HookedModel, x, what: str) -> tuple[list[int], TokenView | None]:
    if isinstance(x, (str, TokenView)):
        view = model.tokenize(x) if isinstance(x, str) else x
        return list(view.ids), view
    ids = torch.as_tensor(x).reshape(-1).tolist() if not isinstance(x, (list, tuple)) else [int(t) for t in x]
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
        return check_int("answers[0]", good, low=0), check_int("answers[1]", bad, low=0)
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


@torch.no_grad()
def patch_sweep(model: HookedModel, old, new, *, answers=None, metric=None, site: str = "resid_pre",
                layers: Sequence[int] | None = None, slots: Sequence[int] | None = None,
                block: int = 16, method: str = "auto", progress: bool = True,
                positions: Sequence[int] | None = None) -> Sweep:
    """Patch NEW into OLD one (layer, position) cell at a time and measure the decision.

    ``old`` / ``new``: aligned prompts (text, TokenView or ids of equal length). The metric is
    read at the last token: ``answers=(good, bad)`` (words or ids: ``logit[good] -
    logit[bad]``) or ``metric(logits [B, vocab]) -> [B]``. ``site``: an activation site
    (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``) or ``"kv"`` /
    ``"kv.k"`` / ``"kv.v"``: NEW's cached K and/or V at (layer, slot) before the last token is
    decoded (``slots`` then run over the slots before it). ``layers`` / ``slots`` (absolute
    indices in the prompt) default to all; ``positions=`` is the deprecated name of ``slots=``. ``block``: cells per batched forward (fewer on a long
    prompt: each row copies the shared cache, so rows are bounded by ``KVCache.rows_within``,
    1 GiB of K/V by default). ``method`` applies
    to ``resid_pre``: ``"lean"`` (exact shortcuts), ``"hooks"`` or ``"auto"``.
    """
    positions = _slots_arg(slots, positions)
    if (answers is None) == (metric is None):
        raise InputError("answers/metric: pass exactly one of answers=(good, bad) or metric=fn(logits) -> [batch]")
    metric = _answer_metric(model, answers) if answers is not None else metric
    if site not in ACT_SITES + KV_SITES:
        raise InputError(f"site={site!r}: choose one of {', '.join(ACT_SITES + KV_SITES)}")
    if block < 1:
        raise InputError(f"block={block}: give a positive number of cells per forward")
    o_ids, o_view = _ids_of(model, old, "old")
    n_ids, _ = _ids_of(model, new, "new")
    if len(o_ids) != len(n_ids):
        raise InputError(f"old has {len(o_ids)} tokens and new {len(n_ids)}: a sweep needs aligned prompts of "
                         "equal token length (change a value of the same token count)")
    n, L = len(o_ids), model.spec.n_layers
    kv = site in KV_SITES
    limit = n - 1 if kv else n
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    positions = list(range(limit)) if positions is None else [int(p) for p in positions]
    bad = [p for p in positions if not 0 <= p < limit]
    if bad:
        raise SlotError(f"slots: slot {bad[0]} is outside 0..{limit - 1} "
                         f"({'the cached slots before the decision token' if kv else 'the prompt'})")
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise SlotError(f"layers: {bad[0]} is outside 0..{L - 1} ({model.name} has {L} layers)")
    m_old = float(metric(model.run(torch.tensor([o_ids]), logits="last").logits[:, -1].float())[0])
    m_new = float(metric(model.run(torch.tensor([n_ids]), logits="last").logits[:, -1].float())[0])
    if site == "resid_pre":
        values = resid_patch_grid(model, o_ids, n_ids, metric, layers=layers, slots=positions, block=block,
                                  method=method, progress=progress)
    else:
        values = _cell_sweep(model, o_ids, n_ids, metric, site, layers, positions, block, progress, m_old)
    tokens = list(o_view.tokens) if o_view is not None else [model.tokenizer.decode([t]) for t in o_ids]
    return Sweep(site, layers, positions, [tokens[p] for p in positions], values, m_old, m_new,
                 {"model": model.name, "first_diff": first_diff_of(o_ids, n_ids)})


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
        past = model.run(torch.tensor([o_ids[:d]]), logits="last").kv if d else None
        clean = model.run(torch.tensor([n_ids[d:]]), past=past, collect=[f"L{l}.{site}" for l in set(layers)],
                          logits="last")

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
