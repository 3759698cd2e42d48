"""Discovery on prefilled pairs: note positions, read heads, write decomposition and a
conclusion direction. Rankings are fit on selection pairs and evaluated on others.

* notes: downstream offsets (distance from the decision token) ranked by single-position
  KV-patch recovery; delimiter share of the positive recovery mass.
* read heads: direct logit attribution of each head's output at the decision step onto
  ``u_good - u_bad`` (NEW minus OLD), then per-head patching of the decision step's
  per-head output (``attn.z``) from NEW into OLD, and the joint top-k.
* write: where the notes are read. The K and V a read head at layer ``l`` attends to are
  computed from ``resid_pre`` of layer ``l`` (the input of the norm feeding K and V) at the
  slots after the field; its NEW - OLD delta there is the sum of the deltas of every
  attention and MLP output below ``l`` (the tokens are the same, so the embedding adds none),
  and each one's share is its projection on that delta.
* direction: difference of means of the residual at the top note on selection pairs; the
  recovery of patching only that component on evaluation pairs, against random directions.
"""

from __future__ import annotations

from collections import defaultdict

import torch

import notekv as nk
from notekv.hooks.positions import DELIMITER_CHARS
from notekv.model.arch import get_submodule
from notekv.runner import RowInterventions, logit_diff, run_variants

from .pairstate import PairState
from .sweeps import _tail


def is_delimiter(token: str) -> bool:
    """A token made only of punctuation and whitespace (the alphabet of :class:`notekv.Delims`)."""
    return token != "" and all(c in DELIMITER_CHARS for c in token)


def rank_offsets(per_position: list[dict], states: list[PairState]) -> list[tuple[int, float]]:
    """Offsets from the decision ranked by mean single-position recovery over pairs."""
    acc = defaultdict(list)
    for pp, st in zip(per_position, states):
        for slot, r in pp.items():
            acc[st.n_ctx - slot].append(r)
    return sorted(((o, sum(v) / len(v)) for o, v in acc.items()), key=lambda x: -x[1])


def delimiter_share(per_position: list[dict], states: list[PairState]) -> float:
    """Share of positive single-position recovery mass, pooled over pairs, that sits on
    delimiter tokens after the field (the notes' slots)."""
    delim = total = 0.0
    for pp, st in zip(per_position, states):
        after = set(st.downstream)
        for slot, r in pp.items():
            if r > 0 and slot in after:
                total += r
                if _delimiter_slot(st, slot):
                    delim += r
    return delim / total if total else float("nan")


def _delimiter_slot(st: PairState, slot: int) -> bool:
    tok = st.pair.tokens[slot]
    return is_delimiter(tok.strip(" ") or tok)


def delimiter_split(per_position: list[dict], states: list[PairState]) -> list[dict]:
    """Per pair, over the slots after the field that were patched one at a time: the share of
    the positive recovery mass on delimiter tokens (``mass_share``), the share of slots that
    are delimiters (``slot_share``), and the mean single-slot recovery on delimiter and on
    other slots."""
    out = []
    for pp, st in zip(per_position, states):
        after = [q for q in st.downstream if q in pp]
        delim = [q for q in after if _delimiter_slot(st, q)]
        other = [q for q in after if q not in set(delim)]
        pos = sum(max(pp[q], 0.0) for q in after)
        out.append({"mass_share": sum(max(pp[q], 0.0) for q in delim) / pos if pos else float("nan"),
                    "slot_share": len(delim) / len(after) if after else float("nan"),
                    "delimiter_mean": sum(pp[q] for q in delim) / len(delim) if delim else float("nan"),
                    "other_mean": sum(pp[q] for q in other) / len(other) if other else float("nan"),
                    "n_delimiter": len(delim), "n_other": len(other)})
    return out


# ---------------------------------------------------------------------- read heads
def _decision_run(model, cache, token: int, sites, interventions=()):
    return model.run(torch.tensor([[token]]), past=cache, collect=sites, interventions=interventions, logits="last")


def head_dla(model: nk.HookedModel, st: PairState) -> torch.Tensor:
    """``[L, H]``: NEW minus OLD direct logit attribution of each head onto ``u_good - u_bad``
    at the decision step (final norm and any post-attention norm linearised at the run)."""
    spec, layout = model.spec, model.spec.layout
    L, H, D = spec.n_layers, spec.n_heads, spec.head_dim
    u = get_submodule(model.hf, layout.unembed).weight
    du = (u[st.pair.good] - u[st.pair.bad]).detach()
    final_norm = get_submodule(model.hf, layout.final_norm)
    sites = [f"L{l}.attn.z" for l in range(L)] + [f"L{l}.attn_out" for l in range(L)] + [f"L{L - 1}.resid_post"]
    out = []
    for cache in (st.old, st.new):
        run = _decision_run(model, cache, st.pair.old_ids[-1], sites)
        x = run[f"L{L - 1}.resid_post"][0, -1]
        with torch.no_grad():
            normed = final_norm(x[None])[0].float()
        # elementwise linearisation of the final norm, in float32; a coordinate that is exactly 0 (bf16
        # rounds some there) has no ratio to take and contributes nothing, instead of a 0/0 that spoils every head
        x = x.float()
        gain = torch.where(x != 0, normed / torch.where(x != 0, x, 1.0), 0.0)
        rows = []
        for l in range(L):
            w = get_submodule(model.hf, f"{layout.layers}.{l}.{layout.attn}.{layout.o_proj}").weight  # [d, H*D]
            z = run[f"L{l}.attn.z"][0, :, -1].float()  # [H, D]
            per_head = torch.einsum("hd,ehd->he", z, w.float().view(-1, H, D))  # [H, d]
            ratio = run[f"L{l}.attn_out"][0, -1].float() / per_head.sum(0)  # post-attention norm, if any
            ratio = torch.nan_to_num(ratio, nan=1.0, posinf=1.0, neginf=1.0)
            rows.append((per_head * ratio * gain) @ du.float())
        out.append(torch.stack(rows))
    return (out[1] - out[0]).detach() * st.pair.expect_new


def head_patch(model: nk.HookedModel, st: PairState, heads: list[tuple[int, int]], joint_ks=()) -> dict:
    """Recovery of patching each head's decision-step output (``attn.z``) from NEW into OLD,
    one head per batch row, plus the joint top-k sets of ``heads`` (in order)."""
    L = model.spec.n_layers
    sites = [f"L{l}.attn.z" for l in range(L)]
    clean = _decision_run(model, st.new, st.pair.old_ids[-1], sites)
    rows = [[h] for h in heads] + [heads[:k] for k in joint_ks]
    last = nk.Pos(len(st.old))  # the decision step's slot

    def patches(part: range):
        chunk = [rows[i] for i in part]
        return [nk.Patch(f"L{l}.attn.z.h{h}", clean, at=nk.PerRow([last if (l, h) in hs else nk.Pos() for hs in chunk]))
                for l, h in dict.fromkeys(c for hs in chunk for c in hs)]

    p = st.pair
    s = run_variants(model, [p.old_ids[-1]], RowInterventions(len(rows), patches), logit_diff(p.good, p.bad),
                     past=st.old)
    rec = st.recovery(s).tolist()
    return {"single": rec[: len(heads)], "joint": dict(zip(joint_ks, rec[len(heads):]))}


# ---------------------------------------------------------------------- write decomposition
def write_decomposition(model: nk.HookedModel, st: PairState) -> dict:
    """Who writes what the notes' K and V are computed from: for every layer ``l``, the NEW -
    OLD delta of ``resid_pre`` at the slots after the field split exactly into the attention
    and MLP outputs of the layers below it, each projected on that delta.

    ``attn[l][j]`` / ``mlp[l][j]``: the share of layer ``j``'s attention (MLP) output in the
    delta entering layer ``l`` (0 for ``j >= l``; each row sums to 1 up to ``closure``, the
    largest gap, which an embedding delta or a write outside the two outputs would open).
    Row 0 is nan: nothing writes below the first layer."""
    L = model.spec.n_layers
    start, prefix = _tail(st)
    after = [s - start for s in st.downstream]
    sites = [f"L{l}.{s}" for l in range(L) for s in ("attn_out", "mlp_out", "resid_pre")]
    runs = [model.run(torch.tensor([ids[start:]]), past=prefix, collect=sites, logits="last")
            for ids in (st.pair.old_ids, st.pair.new_ids)]
    delta = {s: (runs[1][s] - runs[0][s])[0, after].double() for s in sites}
    attn = [[float("nan")] * L for _ in range(L)]
    mlp = [[float("nan")] * L for _ in range(L)]
    closure = 0.0
    for l in range(1, L):
        total = delta[f"L{l}.resid_pre"]
        norm2 = float((total * total).sum())
        if norm2 == 0.0:
            continue
        attn[l] = [float((delta[f"L{j}.attn_out"] * total).sum()) / norm2 if j < l else 0.0 for j in range(L)]
        mlp[l] = [float((delta[f"L{j}.mlp_out"] * total).sum()) / norm2 if j < l else 0.0 for j in range(L)]
        closure = max(closure, abs(1.0 - sum(attn[l]) - sum(mlp[l])))
    return {"attn": attn, "mlp": mlp, "closure": closure}


# ---------------------------------------------------------------------- conclusion direction
def residual_at(model: nk.HookedModel, st: PairState, layer: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLD and NEW ``resid_pre`` at ``layer`` and the slot ``offset`` before the decision."""
    start, prefix = _tail(st)
    local = st.n_ctx - offset - start
    site = f"L{layer}.resid_pre"
    xs = [model.run(torch.tensor([ids[start:]]), past=prefix, collect=[site], logits="last")[site][0, local]
          for ids in (st.pair.old_ids, st.pair.new_ids)]
    return xs[0], xs[1]


def direction_patch(model: nk.HookedModel, st: PairState, layer: int, offset: int, directions: torch.Tensor) -> list[float]:
    """Recovery when OLD's residual (``resid_pre`` at ``layer``, ``offset`` before the
    decision) takes NEW's component along each unit direction ``directions [K, d]``."""
    start, prefix = _tail(st)
    local = st.n_ctx - offset - start
    x_old, x_new = residual_at(model, st, layer, offset)
    dirs = directions.to(device=x_old.device, dtype=torch.float32)
    shift = (((x_new - x_old).float() @ dirs.T)[:, None] * dirs).to(x_old.dtype)  # [K, d]: one per batch row
    p = st.pair

    def steer(part: range):
        return [nk.Steer(f"L{layer}.resid_pre", shift[part.start : part.stop], at=nk.Pos(start + local))]

    s = run_variants(model, p.old_ids[start:], RowInterventions(directions.shape[0], steer),
                     logit_diff(p.good, p.bad), past=prefix)
    return st.recovery(s).tolist()
