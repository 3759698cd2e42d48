"""The past of a hybrid model's forward: attention K/V plus state-space (Mamba) states.

A hybrid (Jamba: Mamba layers interleaved with attention layers) caches, per Mamba layer,
one recurrent state (a conv window ``[B, C, k]`` and an SSM state ``[B, C, N]``) that
summarises every token so far, and per attention layer the usual K/V ``[B, H_kv, S, D]``.
A :class:`~notekv.KVCache` holds per-token K/V of every layer, so it cannot hold this cache
(``run.kv`` refuses, naming the family and the reason); everything that cuts, moves or
patches per-token slots refuses with it.

What still works exactly is continuing: ``model.run(ids, past=run)`` continues the forward
of ``run`` from a private copy of its transformers cache (:class:`StatePast`), so a cached
decode step equals the full forward and the past Run never changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .run import CacheError, Run, as_kvcache, check_hf_cache


@dataclass(frozen=True, eq=False)
class StatePast:
    """A hybrid model's cache as ``model.run`` continues it: the transformers cache of the
    past forward (``cache``: K/V of the attention layers, conv/SSM states of the Mamba
    layers; never modified) and, per past slot, its position ``[S]``, token id ``[S]`` and
    segment label."""

    cache: object
    positions: torch.Tensor
    token_ids: torch.Tensor
    segments: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.positions.numel())

    def to_hf(self, room: int = 0):
        """A private copy of the transformers cache to continue (its states are updated in
        place by the next forward); ``room`` is accepted for symmetry with
        :meth:`KVCache.to_hf` and ignored."""
        return copy.deepcopy(self.cache)


def as_past(source, model, what: str = "past"):
    """What ``model.run`` continues from: :func:`~notekv.hooks.run.as_kvcache` of ``source``,
    except on a hybrid model (``model.spec.kv_refusal`` set), where a :class:`Run` of this
    model or a transformers cache it computed becomes a :class:`StatePast` (a KVCache cannot
    exist for it). None for an empty cache."""
    if model.spec.kv_refusal is None:
        return as_kvcache(source, model, what)
    from transformers.cache_utils import Cache

    if isinstance(source, Run):
        from .interventions import check_source_model

        check_source_model(source, model, what)
        if source.hf_cache is None:
            raise CacheError(f"{what}: this Run kept no transformers cache (it came from a backend without one); "
                             "use model.run")
        meta = source.slot_meta
        n = source.hf_cache.get_seq_length()
        if meta is None:
            meta = (torch.arange(n), torch.full((n,), -1, dtype=torch.int64), ("",) * n)
        return StatePast(source.hf_cache, *meta)
    if isinstance(source, Cache):
        check_hf_cache(source, model, what)
        n = source.get_seq_length()
        if n == 0:
            return None
        return StatePast(source, torch.arange(n), torch.full((n,), -1, dtype=torch.int64), ("",) * n)
    return as_kvcache(source, model, what)  # a KVCache (none exists for this model) or a wrong type: refused there
