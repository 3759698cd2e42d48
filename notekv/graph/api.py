"""``nk.circuit``: the notes circuit of aligned OLD/NEW pairs as a graph.

>>> g = nk.circuit(model, old_texts, new_texts, answers=(" yes", " no"))
>>> g.figure()          # plotly layered node-link graph of the ranked edges
>>> g.faithfulness()    # recovery curves of top-k / complement / random circuits, areas, minimal sizes
>>> g.dispersion()      # write dispersion vs read concentration, with the verdict
>>> g.agreement()       # attribution vs exact path patching on the checked edges
>>> CircuitGraph.load(g.to_json())

Pairs are deduplicated by token ids and split at random (by prompt: pairs sharing an OLD or
NEW prompt stay together) into selection pairs, on which edges are ranked and drawn, and
evaluation pairs, on which circuits are scored and the dispersion measured; one pair is
both (``held_out`` False). Edges of different pairs are matched by key: a cell by its place
(``field+i`` for the field's slots, ``-k`` for the slot ``k`` before the decision) or by
the ``keys`` given.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..attribution.agreement import agreement, summarize as summarize_agreement
from ..errors import InputError, InputTypeError, check_int
from ..kv import KVCache
from ..runner import progress_bar
from . import dispersion as disp
from . import faithfulness as faith
from .edges import METHODS, EdgeIndex, EdgeScores, attribute, exact_edges, full_circuit
from .figure import layered
from .readout import Decision, check_model, decision, readout

MIN_SWING = 0.5  # |s_new - s_old| below this (logits) leaves a pair out, as in the paper
FORMAT = "notekv.circuit_graph/1"


@dataclass
class PairGraph:
    """One pair's graph: prompts, field, scores of every edge under each method (logits) and
    the exact values of the checked edges."""

    old_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    good: int
    bad: int
    tokens: list[str]
    field: list[int]  # slots where OLD and NEW differ
    first: int  # the first field slot: cells are slots first..n_slots-1
    n_slots: int  # cached context (the decision token is slot n_slots)
    n_layers: int
    n_heads: int
    s_old: float
    s_new: float
    s_graph: float  # every edge at NEW
    scores: dict[str, EdgeScores]
    checked: list[int] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    keys: list = field(default_factory=list)  # a key per cell (slot first + c)

    @property
    def swing(self) -> float:
        return self.s_new - self.s_old

    @property
    def index(self) -> EdgeIndex:
        return EdgeIndex(self.n_layers, self.n_slots - self.first, self.n_heads)

    def edge_keys(self) -> list[tuple]:
        """The key of every edge, in flat order."""
        L, C, H = self.n_layers, self.n_slots - self.first, self.n_heads
        out = [("fc", l, self.keys[c]) for l in range(L) for c in range(C)]
        out += [("ch", l, self.keys[c], h) for l in range(L) for c in range(C) for h in range(H)]
        return out + [("hl", l, h) for l in range(L) for h in range(H)]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("good", "bad", "tokens", "field", "first", "n_slots", "n_layers", "n_heads",
                                            "s_old", "s_new", "s_graph", "checked", "exact", "keys")}
        return {**d, "old_ids": list(self.old_ids), "new_ids": list(self.new_ids),
                "scores": {m: s.to_dict() for m, s in self.scores.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "PairGraph":
        kw = {k: d[k] for k in ("good", "bad", "tokens", "field", "first", "n_slots", "n_layers", "n_heads", "s_old",
                                "s_new", "s_graph", "checked", "exact")}
        return cls(old_ids=tuple(d["old_ids"]), new_ids=tuple(d["new_ids"]), keys=[_key(k) for k in d["keys"]],
                   scores={m: EdgeScores.from_dict(s) for m, s in d["scores"].items()}, **kw)


def _key(k):
    return tuple(k) if isinstance(k, list) else k


class CircuitGraph:
    """The notes graph of a set of pairs (see the module docstring). Built by
    :func:`circuit`; ``pairs``, ``selection`` / ``evaluation`` (indices into ``pairs``),
    ``method`` (what ranks edges), ``meta``."""

    def __init__(self, pairs: list[PairGraph], selection: list[int], evaluation: list[int], method: str, meta: dict,
                 model=None, results: dict | None = None):
        self.pairs, self.selection, self.evaluation = pairs, selection, evaluation
        self.method, self.meta, self.model = method, meta, model
        self.results = dict(results or {})
        self._decisions: dict[int, Decision] = {}

    def __repr__(self) -> str:
        return (f"CircuitGraph({self.meta.get('model', '?')}: {len(self.pairs)} pairs, {len(self.selection)} selection / "
                f"{len(self.evaluation)} evaluation, {self.pairs[0].index.n} edges in the first, ranked by {self.method})")

    @property
    def held_out(self) -> bool:
        return not set(self.selection) & set(self.evaluation)

    # ------------------------------------------------------------------ ranking
    def ranking(self, method: str | None = None) -> list[tuple[tuple, float]]:
        """Edge keys with their mean score over selection pairs in units of each pair's swing
        (a key a pair lacks counts 0 there), largest magnitude first."""
        method = _method(method or self.method)
        acc: dict[tuple, float] = {}
        for i in self.selection:
            p = self.pairs[i]
            vals = (p.scores[method].flat() / p.swing).tolist()
            for k, v in zip(p.edge_keys(), vals):
                acc[k] = acc.get(k, 0.0) + v
        n = len(self.selection)
        return sorted(((k, v / n) for k, v in acc.items()), key=lambda kv: (-abs(kv[1]), str(kv[0])))

    # ------------------------------------------------------------------ outputs
    def figure(self, edges: int = 40, method: str | None = None):
        """A plotly layered node-link graph of the ``edges`` strongest ranked edges (weights in
        units of the swing, averaged over selection pairs); nodes labelled by token and
        layer / head. Returns the figure."""
        edges = check_int("edges", edges, low=1)
        ref = self.pairs[self.selection[0]]
        labels = {"field": "field " + " ".join(f"{ref.tokens[q]!r}" for q in ref.field),
                  "slot_order": {k: c for c, k in enumerate(ref.keys)},
                  "slot_token": {k: ref.tokens[ref.first + c] for c, k in enumerate(ref.keys)},
                  "logit": "logit[good] - logit[bad]"}
        title = (f"notes graph of {self.meta.get('model', 'the model')}: top {edges} edges ranked by {method or self.method} "
                 f"on {len(self.selection)} selection pair(s)")
        return layered(self.ranking(method)[:edges], labels, title=title)

    def agreement(self) -> dict:
        """Each method's estimate against exact path patching on the checked edges: Spearman,
        top-k overlap and recall per pair, then means with bootstrap intervals over pairs."""
        out = {}
        for m in METHODS:
            per = [agreement(p.scores[m].flat()[p.checked], torch.tensor(p.exact)) for p in self.pairs if p.checked]
            out[m] = summarize_agreement(per, seed=self.meta.get("seed", 0))
        out["n_edges_per_pair"] = [len(p.checked) for p in self.pairs]
        out["n_pairs"] = sum(1 for p in self.pairs if p.checked)
        return out

    def faithfulness(self, *, n_random: int = 5, max_size: int | None = None, seed: int | None = None,
                     progress: bool = True) -> dict:
        """Top-k, complement and random circuits of the ranked edges on evaluation pairs (see
        :mod:`notekv.graph.faithfulness`): recovery curves with intervals, areas, the smallest
        circuits reaching 80% / 90% of the swing, and ``full_graph`` (every edge at NEW).
        ``max_size``: the largest circuit size tried (default every ranked edge). Needs the
        model (a loaded graph answers from its stored result)."""
        n_random = check_int("n_random", n_random, low=1)
        seed = self.meta.get("seed", 0) if seed is None else check_int("seed", seed)
        tag = f"faithfulness/{n_random}/{max_size}/{seed}"
        if tag in self.results:
            return self.results[tag]
        model = self._need_model("faithfulness")
        ranked = [k for k, _ in self.ranking()]
        n_ranked = len(ranked)
        sizes = [k for k in faith.sizes_for(n_ranked) if max_size is None or k <= max_size]
        rng = np.random.default_rng(seed)
        curves = []
        for i in progress_bar(self.evaluation, progress=progress, desc="faithfulness", leave=False):
            p = self.pairs[i]
            where = {k: j for j, k in enumerate(p.edge_keys())}
            order = [where[k] for k in ranked if k in where]
            raw = faith.pair_curve(model, self._decision(i), order, p.index.n, sizes, n_random, rng)
            curves.append({k: (np.asarray(v) - p.s_old) / p.swing for k, v in raw.items()})
        graph = [(self.pairs[i].s_graph - self.pairs[i].s_old) / self.pairs[i].swing for i in self.evaluation]
        out = faith.summarize([{k: v.tolist() for k, v in c.items()} for c in curves], sizes, n_ranked, seed=seed,
                              graph=graph)
        out["full_graph"] = _summary(graph, seed)
        out.update({"method": self.method, "held_out": self.held_out, "n_selection": len(self.selection),
                    "n_random": n_random})
        self.results[tag] = out
        return out

    def dispersion(self, method: str | None = None) -> dict:
        """Write dispersion and read concentration on evaluation pairs, with the verdict (see
        :mod:`notekv.graph.dispersion`)."""
        method = _method(method or self.method)
        per = [disp.pair_dispersion(p.scores[method].fc, p.scores[method].hl, p.tokens, p.first, p.field)
               for p in (self.pairs[i] for i in self.evaluation)]
        out = disp.summarize(per, model=self.meta.get("model", ""), seed=self.meta.get("seed", 0))
        out["method"] = method
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """The graph as JSON (pairs, scores, split, stored results); written to ``path`` if given."""
        text = json.dumps({"format": FORMAT, "meta": self.meta, "method": self.method, "selection": self.selection,
                           "evaluation": self.evaluation, "pairs": [p.to_dict() for p in self.pairs],
                           "results": self.results}, default=_jsonable)
        if path is not None:
            try:
                Path(path).write_text(text)
            except OSError as err:
                raise InputError(f"path={str(path)!r}: cannot write there ({err.strerror or err})") from None
        return text

    @classmethod
    def load(cls, source: str | Path, model=None) -> "CircuitGraph":
        """A graph from :meth:`to_json`'s text or a file holding it (``model``: to compute what
        was not stored)."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(source).read_text()
            except OSError as err:
                raise InputError(f"source={str(source)!r:.80}: neither graph JSON nor a readable file "
                                 f"({err.strerror or err})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"source: not valid JSON ({err.msg} at {err.pos})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"source: not a notes graph (format {d.get('format') if isinstance(d, dict) else None!r}, "
                             f"expected {FORMAT!r}); save one with CircuitGraph.to_json")
        return cls([PairGraph.from_dict(p) for p in d["pairs"]], d["selection"], d["evaluation"], d["method"],
                   d["meta"], model=model, results=d.get("results"))

    # ------------------------------------------------------------------ internals
    def _need_model(self, what: str):
        if self.model is None:
            raise InputError(f"{what}: this graph was loaded without a model; pass CircuitGraph.load(..., model=model)")
        return self.model

    def _decision(self, i: int) -> Decision:
        if i not in self._decisions:
            p = self.pairs[i]
            old, new = _prefill(self.model, p.old_ids, p.new_ids, p.first)
            self._decisions[i] = decision(self.model, old, new, p.old_ids[-1], p.good, p.bad, p.first)
        return self._decisions[i]


def _summary(x, seed):
    from ..stats import summary

    return summary(x, seed=seed)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def _method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"method={method!r}: choose one of {METHODS}")
    return method


# ---------------------------------------------------------------------- building
def _prompts(x, what: str) -> list:
    """One prompt (text or ids) or a list of them -> a list of prompts."""
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(v, int) for v in x)):
        return [x]
    if isinstance(x, torch.Tensor):
        return [x.reshape(-1).tolist()] if x.dim() <= 1 or x.shape[0] == 1 else [r.tolist() for r in x]
    if isinstance(x, (list, tuple)) and x:
        return list(x)
    raise InputTypeError(f"{what}={x!r:.60}: pass a prompt (text or token ids) or a list of prompts")


def _ids(model, x, what: str) -> list[int]:
    from ..sweep import _ids_of

    return _ids_of(model, x, what)[0]


def _answer(model, x, what: str) -> int:
    from ..sweep import token_id_arg

    if isinstance(x, str):
        ids = model.tokenizer(x, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{what}={x!r} is {len(ids)} tokens {ids}, not one: the decision reads one token; pass a "
                             "word that is a single token (often with its leading space, e.g. ' yes') or its id")
        return ids[0]
    return token_id_arg(model, what, x)


def _answers(model, answers, n: int) -> list[tuple[int, int]]:
    pairs = answers if isinstance(answers, list) and answers and isinstance(answers[0], (list, tuple)) else [answers] * n
    if len(pairs) != n:
        raise InputError(f"answers: {len(pairs)} answer pairs for {n} prompt pairs; give one (good, bad) for all or one "
                         "per pair")
    out = []
    for a in pairs:
        if not isinstance(a, (list, tuple)) or len(a) != 2:
            raise InputError(f"answers={a!r}: give (good, bad), two single-token words or token ids")
        g, b = _answer(model, a[0], "answers[0]"), _answer(model, a[1], "answers[1]")
        if g == b:
            raise InputError(f"answers={a!r}: good and bad are the same token {g}, so logit[good] - logit[bad] is 0 "
                             "whatever the cache holds; give two different answers")
        out.append((g, b))
    return out


def _prefill(model, old_ids, new_ids, first: int) -> tuple[KVCache, KVCache]:
    """OLD and NEW caches of everything before the decision token; the shared prefix once."""
    prefix = model.run(torch.tensor([list(old_ids[:first])]), logits="last") if first else None
    caches = []
    for ids in (old_ids, new_ids):
        run = model.run(torch.tensor([list(ids[first:-1])]), past=prefix, logits="last")
        caches.append(KVCache.from_hf(run.hf_cache, model, list(ids[:-1])))
    return caches[0], caches[1]


def default_keys(first: int, field: Sequence[int], n_slots: int) -> list[str]:
    """A key per cell: ``field+i`` up to the last field slot, ``-k`` for the slot ``k``
    before the decision after it."""
    last = max(field)
    return [f"field+{q - first}" if q <= last else f"-{n_slots - q}" for q in range(first, n_slots)]


def split_pairs(ids: list[tuple[tuple, tuple]], seed: int) -> tuple[list[int], list[int]]:
    """Selection and evaluation halves of distinct pairs, pairs sharing a prompt together
    (groups shuffled, each to the half with fewer pairs so far, evaluation first)."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for o, n in ids:
        parent[find(o)] = find(n)
    groups: dict = {}
    for i, (o, _) in enumerate(ids):
        groups.setdefault(find(o), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    sel: list[int] = []
    ev: list[int] = []
    for g in order:
        (ev if len(ev) <= len(sel) else sel).extend(g)
    return sorted(sel), sorted(ev)


def circuit(model, old, new, *, answers, steps: int = 8, method: str = "ig", check: int = 64, seed: int = 0,
            min_swing: float = MIN_SWING, keys: Sequence[Sequence] | None = None, progress: bool = True) -> CircuitGraph:
    """The notes graph of aligned OLD/NEW prompt pairs (see :mod:`notekv.graph`).

    ``old`` / ``new``: a prompt (text or token ids) each, or equal-length lists of them; each
    pair of equal token length, differing somewhere before its last token (the decision token,
    decoded against each cache). ``answers``: ``(good, bad)``, single-token words or ids (or a
    list, one per pair); the score is ``logit[good] - logit[bad]``. ``steps``: points of the
    OLD -> NEW path the IG estimate averages over. ``method``: the estimate that ranks edges
    (``"ig"``, ``"fixed"``, ``"plain"``). ``check``: edges per pair checked by exact path
    patching (half the estimate's largest, half at random). ``min_swing``: pairs whose
    ``|s_new - s_old|`` is below it (logits) are left out. ``keys``: one key per cell (slot
    from the first differing token to the last before the decision) for each pair, to match
    edges across pairs (default: place relative to the field and the decision).
    """
    check_model(model)
    method = _method(method)
    steps = check_int("steps", steps, low=1)
    check = check_int("check", check, low=0)
    seed = check_int("seed", seed)
    if isinstance(min_swing, bool) or not isinstance(min_swing, (int, float)) or min_swing < 0:
        raise InputError(f"min_swing={min_swing!r}: pass a non-negative number of logits (0 keeps every pair)")
    olds, news = _prompts(old, "old"), _prompts(new, "new")
    if len(olds) != len(news):
        raise InputError(f"old has {len(olds)} prompts and new {len(news)}: give one NEW prompt per OLD prompt")
    answer_ids = _answers(model, answers, len(olds))
    if keys is not None and len(keys) != len(olds):
        raise InputError(f"keys: {len(keys)} key lists for {len(olds)} pairs; give one per pair")
    raw: dict[tuple, tuple] = {}
    for i, (o, n) in enumerate(zip(olds, news)):
        oi, ni = _ids(model, o, f"old[{i}]"), _ids(model, n, f"new[{i}]")
        if len(oi) != len(ni):
            raise InputError(f"pair {i}: old is {len(oi)} tokens and new {len(ni)}; the graph needs aligned prompts of "
                             "equal token length (pick values that tokenize to the same number of tokens)")
        diff = [q for q, (a, b) in enumerate(zip(oi, ni)) if a != b]
        if not diff:
            raise InputError(f"pair {i}: old and new are the same tokens; change the field in new")
        if diff[-1] == len(oi) - 1:
            raise InputError(f"pair {i}: old and new differ at their last token, the decision token; the field must "
                             "come before it (end both prompts with the same decision cue)")
        raw.setdefault((tuple(oi), tuple(ni)), (i, answer_ids[i], diff))
    pairs: list[PairGraph] = []
    decisions: list[Decision] = []
    left_out = 0
    for (oi, ni), (i, (good, bad), diff) in progress_bar(list(raw.items()), progress=progress, desc="notes graph"):
        first, S = diff[0], len(oi) - 1
        old_c, new_c = _prefill(model, oi, ni, first)
        dec = decision(model, old_c, new_c, oi[-1], good, bad, first)
        lg = model.run(torch.tensor([[ni[-1]]]), past=new_c, logits="last").logits[0, -1].float()
        s_new = float(lg[good] - lg[bad])
        if abs(s_new - dec.s_old) < min_swing or s_new == dec.s_old:
            left_out += 1
            continue
        cell_keys = default_keys(first, diff, S) if keys is None else [_key(k) for k in keys[i]]
        if len(cell_keys) != S - first:
            raise InputError(f"keys[{i}]: {len(cell_keys)} keys for {S - first} cells (slots {first}..{S - 1})")
        scores = attribute(model, dec, steps=steps, progress=progress)
        s_graph = float(readout(model, dec, full_circuit(dec)[None])[0])
        idx = EdgeIndex(dec.n_layers, dec.n_cells, dec.n_heads)
        checked = _sample(scores[method].flat(), min(check, idx.n), seed + len(pairs))
        exact = exact_edges(model, dec, checked, progress=progress).tolist() if checked else []
        tokens = [model.tokenizer.decode([t]) for t in oi]
        pairs.append(PairGraph(oi, ni, good, bad, tokens, diff, first, S, dec.n_layers, dec.n_heads, dec.s_old, s_new,
                               s_graph, scores, checked, exact, cell_keys))
        decisions.append(dec)
    if not pairs:
        raise InputError(f"no pair moves the decision by at least min_swing={min_swing} logits ({left_out} left out); "
                         "pick prompts whose decision depends on the field, or lower min_swing")
    ids = [(p.old_ids, p.new_ids) for p in pairs]
    sel, ev = split_pairs(ids, seed) if len(pairs) > 1 else ([0], [0])
    if not sel:
        sel = ev  # one group of pairs sharing prompts: no held-out half
    meta = {"model": getattr(model, "name", ""), "steps": steps, "check": check, "seed": seed, "min_swing": min_swing,
            "n_given": len(olds), "n_distinct": len(raw), "n_left_out_small_swing": left_out}
    g = CircuitGraph(pairs, sel, ev, method, meta, model=model)
    g._decisions = dict(enumerate(decisions))
    return g


def _sample(scores: torch.Tensor, n: int, seed: int) -> list[int]:
    """``n`` edges: half the largest ``|scores|``, half at random from the rest."""
    if n == 0:
        return []
    top = torch.argsort(-scores.abs(), stable=True)[: n // 2].tolist()
    rest = sorted(set(range(scores.numel())) - set(top))
    return top + random.Random(seed).sample(rest, min(n - len(top), len(rest)))


__all__ = ["CircuitGraph", "PairGraph", "circuit", "default_keys", "split_pairs"]
