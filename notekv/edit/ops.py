"""Cache operations behind the edit modes. Each takes a KVCache and returns a new one; none
writes into its input (the shared prefilled cache stays bitwise unchanged).

* :func:`refresh_slots` — recompute a contiguous run of tokens against everything before it
  (in-place field refresh; exact when that prefix is exact).
* :func:`append` — prefill text after the cache (errata, hoisted restatements).
* :func:`recompute_from` — keep slots ``< c`` and prefill new ids from ``c`` (the full
  recompute with prefix reuse).
* :func:`recompute_selected` — CacheBlend-style faithful selective recompute: the chosen
  slots are recomputed through every layer in one forward; at each layer their queries read
  the cache as it stands (stale K/V of every unchosen slot) plus the fresh K/V of the chosen
  slots at or before them, computed in the same pass; their stale K/V are masked out.
* rankings of candidate slots: decision attention, K/V deviation (a shallow probe), random.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from dataclasses import dataclass

from ..hooks.interventions import Collect, Hook, Intervention, Knockout
from ..hooks.sitemap import MASK_SITE
from ..hooks.sites import Site
from ..model.attnmath import visible
from .document import EditError
from ..hooks.positions import Pos
from ..hooks.stop import stop, stopped
from ..kv.cache import KVCache, write_slots


def head(cache: KVCache, n: int) -> KVCache:
    """The first ``n`` slots as views (no copy)."""
    return replace(
        cache, keys=cache.keys[..., :n, :], values=cache.values[..., :n, :], positions=cache.positions[:n],
        token_ids=cache.token_ids[:n], segments=cache.segments[:n], origin_keys=cache.origin_keys[..., :n, :],
        origin_positions=cache.origin_positions[:n],
    )


def _from_run(run, model, token_ids: torch.Tensor, segments: tuple[str, ...]) -> KVCache:
    kv = KVCache.from_hf(run.hf_cache, model, token_ids)
    return replace(kv, segments=tuple(segments))


@torch.no_grad()
def refresh_slots(model, cache: KVCache, start: int, ids: Sequence[int]) -> KVCache:
    """A copy of ``cache`` whose slots ``start .. start + len(ids) - 1`` hold ``ids`` recomputed
    against the cache's slots before ``start``; later slots are kept as they are (stale)."""
    n = len(ids)
    if start < 1:
        raise EditError("cannot refresh slot 0 in place (it has no prefix); use mode='full'")
    run = model.run(torch.tensor([list(ids)]), past=head(cache, start), logits="last")
    keys, values = cache.keys.clone(), cache.values.clone()
    write_slots(keys, values, run, slice(start, None), slice(start, start + n))
    token_ids = cache.token_ids.clone()
    token_ids[start : start + n] = torch.tensor(list(ids))
    return replace(cache, keys=keys, values=values, token_ids=token_ids, origin_keys=keys,
                   origin_positions=cache.positions)


@torch.no_grad()
def append(model, cache: KVCache, text: str, label: str) -> tuple[KVCache, int]:
    """``cache`` followed by ``text`` prefilled against it; returns the cache and the token count."""
    ids, _ = model.encode(text, start=len(cache))
    run = model.run(ids, past=cache, logits="last")
    token_ids = torch.cat([cache.token_ids, ids[0]])
    return _from_run(run, model, token_ids, cache.segments + (label,) * ids.shape[1]), ids.shape[1]


@torch.no_grad()
def recompute_from(model, cache: KVCache, c: int, ids: Sequence[int], segments: tuple[str, ...]) -> KVCache:
    """Slots ``< c`` of ``cache`` kept, ``ids[c:]`` prefilled after them (``ids`` is the whole
    new document; ``segments`` its labels)."""
    ids = list(ids)
    if c >= len(ids):
        return replace(head(cache, len(ids)), segments=tuple(segments))
    run = model.run(torch.tensor([ids[c:]]), past=head(cache, c) if c else None, logits="last")
    return _from_run(run, model, torch.tensor(ids), segments)


@torch.no_grad()
def recompute_selected(model, cache: KVCache, slots: Sequence[int]) -> KVCache:
    """Faithful selective recompute of ``slots`` (see the module docstring).

    The chosen tokens run as one forward appended after the whole cache, with RoPE positions
    of their own slots; per query (chosen slot ``p``) a knockout removes the stale keys at
    slots ``>= p`` and the stale copies of every chosen slot, so it attends to the stale
    unchosen slots before ``p`` and to the fresh chosen slots up to itself. The fresh K/V then
    replace the chosen slots, layer by layer as computed.
    """
    p = sorted(int(s) for s in slots)
    if not p:
        return cache
    s_len = len(cache)
    if p[0] < 1 or p[-1] >= s_len:
        raise EditError(f"slots: selected slots must lie in 1..{s_len - 1}, got {p[0]}..{p[-1]}")
    chosen = set(p)
    kos: list = []
    for i, slot in enumerate(p):
        src = sorted(chosen | set(range(slot, s_len)))
        kos.append(Knockout(src=Pos(src), dst=Pos(s_len + i)))
    if any(model.spec.window_of(l) is not None for l in range(model.spec.n_layers)):
        # The chosen tokens sit at slots s_len + i but stand at positions p[i]: the model's
        # sliding windows, measured in slots, would hide their real neighbours.
        kos.insert(0, _WindowByPosition(tuple(p), tuple(int(x) for x in cache.positions) + tuple(
            int(cache.positions[s]) for s in p)))
    ids = cache.token_ids[p][None]
    run = model.run(ids, past=cache, positions=cache.positions[p], interventions=kos, logits="last")
    keys, values = cache.keys.clone(), cache.values.clone()
    write_slots(keys, values, run, slice(s_len, None), torch.tensor(p))
    return replace(cache, keys=keys, values=values, origin_keys=keys, origin_positions=cache.positions)


@dataclass(frozen=True)
class _WindowByPosition(Intervention):
    """On sliding-window layers, the keys the appended queries see, measured by RoPE
    positions: query ``i`` stands at ``q_pos[i]``, the key at slot ``j`` at ``key_pos[j]``;
    it sees the keys at or before it within the window (knockouts still apply after)."""

    q_pos: tuple[int, ...]
    key_pos: tuple[int, ...]

    def compile(self, model):
        spec = model.spec
        qpos, kpos = torch.tensor(self.q_pos), torch.tensor(self.key_pos)

        def make(window: int):
            def op(mask, ctx):
                n = mask.n_queries
                mask.see_only(torch.arange(n), visible(qpos[-n:], kpos[: mask.n_keys], window))
            return op
        return [(Site(MASK_SITE, l), make(spec.window_of(l))) for l in range(spec.n_layers)
                if spec.window_of(l) is not None]


# ---------------------------------------------------------------------- rankings
@torch.no_grad()
def rank_by_attention(model, cache: KVCache, candidates: Sequence[int], cue: str) -> list[int]:
    """Candidates ordered by the attention the cue's last token pays them (mean over layers
    and query heads), read on ``cache`` (cost: one forward of the cue, eager attention)."""
    n = model.spec.n_layers
    ids, _ = model.encode(cue, start=len(cache))
    run = model.run(ids, past=cache, collect=[f"L{l}.attn.pattern" for l in range(n)], logits="last")
    cand = torch.tensor(list(candidates))
    score = sum(run[f"L{l}.attn.pattern"][0, :, -1, cand].float().mean(0) for l in range(n))
    order = torch.argsort(score, descending=True, stable=True)
    return [int(cand[i]) for i in order]


@torch.no_grad()
def rank_by_deviation(model, cache: KVCache, candidates: Sequence[int], probe_layer: int = 1) -> list[int]:
    """Candidates ordered by how far their K/V at ``probe_layer`` move when they are recomputed
    against the cache before them (CacheBlend's selection signal). Runs the contiguous tail of
    the cache from the first candidate through layers ``0..probe_layer`` only (cost:
    ``len(tail) * (probe_layer + 1) / L`` token-forwards). Layer 0 K/V of a token do not
    depend on its context, so ``probe_layer`` must be at least 1."""
    cand = sorted(int(c) for c in candidates)
    if not 1 <= probe_layer < model.spec.n_layers:
        raise EditError(f"probe_layer={probe_layer}: probe_layer must be in 1..{model.spec.n_layers - 1}")
    start = cand[0]
    ids = cache.token_ids[start:][None]

    site_k, site_v = f"L{probe_layer}.attn.k", f"L{probe_layer}.attn.v"
    past = head(cache, start).to_hf()
    with model.hooks(Collect(site_k), Collect(site_v), Hook(f"L{probe_layer}.resid_post", stop)) as hl, stopped():
        model.hf(input_ids=ids.to(model.device), past_key_values=past, use_cache=True, logits_to_keep=1)
    k, v = hl.acts(site_k)[-1][0], hl.acts(site_v)[-1][0]  # [H, n, D]
    rel = torch.tensor([c - start for c in cand])
    dk = (k[:, rel] - cache.keys[probe_layer, 0][:, cand]).float().norm(dim=(0, 2))
    dv = (v[:, rel] - cache.values[probe_layer, 0][:, cand]).float().norm(dim=(0, 2))
    order = torch.argsort(dk + dv, descending=True, stable=True)
    return [cand[int(i)] for i in order]


def rank_random(candidates: Sequence[int], seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    cand = list(candidates)
    return [cand[int(i)] for i in torch.randperm(len(cand), generator=g)]
