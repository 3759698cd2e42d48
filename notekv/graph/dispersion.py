""""Distributed write, concentrated read", in numbers.

*Write*: the mass of the field -> note edges (``|score|`` of each ``fc`` edge into a cell
after the field, i.e. how much what that (layer, slot) writes carries the field to the
decision) spread over the notes' (layer, slot) cells. *Read*: the mass of the head -> logit
edges spread over the (layer, head) nodes at the decision. Each spread is described by its
entropy ``H`` (nats), effective number ``exp(H)``, evenness ``H / log N`` (0: one node holds
everything, 1: spread evenly over all ``N``), the share held by the top 5% of nodes, and (for
the write) the share on delimiter tokens against the delimiters' share of the slots and the
share on the field's own cells (the direct read of the field).

The verdict compares write and read evenness pair by pair: the model shows "distributed
write, concentrated read" when the write's evenness exceeds the read's, the bootstrap
interval of the paired difference over distinct pairs excluding 0. It says so, or says it
does not, with the numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..hooks.positions import DELIMITER_CHARS
from ..stats import summary

TOP_SHARE = 0.05


def is_delimiter(token: str) -> bool:
    """A token made only of punctuation and whitespace (the alphabet of :class:`notekv.Delims`)."""
    t = token.strip(" ") or token
    return t != "" and all(c in DELIMITER_CHARS for c in t)


def spread(mass: np.ndarray) -> dict:
    """Entropy, effective number, evenness and top-5% share of a non-negative mass vector."""
    m = np.asarray(mass, dtype=np.float64).reshape(-1)
    total = m.sum()
    n = m.size
    if n == 0 or total <= 0:
        return {"entropy": math.nan, "effective": math.nan, "evenness": math.nan, "top_share": math.nan, "n_nodes": n}
    p = m / total
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    k = max(1, math.ceil(TOP_SHARE * n))
    return {"entropy": h, "effective": math.exp(h), "evenness": h / math.log(n) if n > 1 else math.nan,
            "top_share": float(np.sort(p)[::-1][:k].sum()), "n_nodes": n}


def pair_dispersion(fc: torch.Tensor, hl: torch.Tensor, tokens: list[str], first: int, field: list[int]) -> dict:
    """One pair's write and read spreads. ``fc [L, C]`` / ``hl [L, Hq]``: edge scores;
    ``tokens``: the context's tokens (slot ``first + c`` is cell ``c``); ``field``: the slots
    that differ (the field's own cells)."""
    w = fc.abs().double().numpy()
    C = w.shape[1]
    slots = [first + c for c in range(C)]
    own = [c for c, q in enumerate(slots) if q in set(field)]
    notes = [c for c, q in enumerate(slots) if q > max(field)]
    wn = w[:, notes]
    total = float(w.sum())
    delim = [i for i, c in enumerate(notes) if is_delimiter(tokens[slots[c]])]
    note_mass = float(wn.sum())
    write = {**spread(wn), "slots": spread(wn.sum(0)), "layers": spread(wn.sum(1)),
             "delimiter_mass_share": float(wn[:, delim].sum() / note_mass) if note_mass > 0 else math.nan,
             "delimiter_slot_share": len(delim) / len(notes) if notes else math.nan,
             "field_own_share": float(w[:, own].sum() / total) if total > 0 else math.nan,
             "n_note_slots": len(notes)}
    read = {**spread(hl.abs().double().numpy()), "layers": spread(hl.abs().double().sum(1).numpy())}
    return {"write": write, "read": read}


def summarize(per_pair: list[dict], model: str = "", seed: int = 0) -> dict:
    """Means with bootstrap intervals over pairs, the paired write - read evenness difference
    and the verdict."""
    def col(part, key, sub=None):
        return [(p[part][sub][key] if sub else p[part][key]) for p in per_pair]

    out: dict = {"n": len(per_pair)}
    for part in ("write", "read"):
        out[part] = {k: summary(col(part, k), seed=seed) for k in ("entropy", "effective", "evenness", "top_share",
                                                                     "n_nodes")}
        out[part]["layers_evenness"] = summary(col(part, "evenness", "layers"), seed=seed)
    out["write"]["slots_evenness"] = summary(col("write", "evenness", "slots"), seed=seed)
    for k in ("delimiter_mass_share", "delimiter_slot_share", "field_own_share"):
        out["write"][k] = summary(col("write", k), seed=seed)
    out["write"]["delimiter_excess"] = summary([a - b for a, b in zip(col("write", "delimiter_mass_share"),
                                                                      col("write", "delimiter_slot_share"))], seed=seed)
    out["evenness_write_minus_read"] = summary([a - b for a, b in zip(col("write", "evenness"),
                                                                      col("read", "evenness"))], seed=seed)
    out["shows"], out["verdict"] = verdict(out, model)
    return out


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def verdict(d: dict, model: str = "") -> tuple[bool | None, str]:
    """``(shows, sentence)`` from the summarized numbers (computed, never written by hand)."""
    diff, w, r = d["evenness_write_minus_read"], d["write"], d["read"]
    who = f"{model}: " if model else ""
    n = diff["n"]
    if not n:
        return None, f"{who}no pair with write and read mass to compare"
    lo, hi = diff["ci"]
    nums = (f"write evenness {_fmt(w['evenness'])} over {w['n_nodes']['mean']:.0f} note cells (effective number "
            f"{_fmt(w['effective'], 1)}), read evenness {_fmt(r['evenness'])} over {r['n_nodes']['mean']:.0f} heads "
            f"(effective number {_fmt(r['effective'], 1)}; top 5% of heads hold {_fmt(r['top_share'])} of the read "
            f"mass); paired difference {_fmt(diff)}, n={n} distinct pairs")
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
        return None, f"{who}too few pairs to tell (n={n}): {nums}"
    if lo > 0:
        return True, f"{who}shows distributed write, concentrated read: the write is spread more evenly than the read; {nums}"
    if hi < 0:
        return False, (f"{who}does not show distributed write, concentrated read: the read is spread more evenly "
                       f"than the write; {nums}")
    return False, (f"{who}does not show distributed write, concentrated read at this n: write and read evenness are "
                   f"not distinguishable; {nums}")
