"""Cheap load-time checks that the hook layer sees the model the way the model computes.

They need the hook layer, so they live on this floor rather than beside the loaders.
"""

from __future__ import annotations

import torch

from ..errors import NotekvError
from .interventions import Hook
from .model import HookedModel

CANARY_TEXT = "The order status is delivered. Refund request: granted."


class CanaryError(NotekvError, AssertionError):
    """A load canary failed: notekv's view of this model is not faithful."""


def _row_sums(model: HookedModel, scores, layer: int):
    """What each attention row of ``layer`` sums to: 1, or with attention sinks the share the
    sink leaves to the real keys, ``sigmoid(logsumexp(scores) - sink)`` ``[B, H, S_q]``."""
    if not model.spec.layout.attn_sinks:
        return 1.0
    from ..model.arch import get_submodule

    lay = model.spec.layout
    sinks = get_submodule(model.hf, f"{lay.layers}.{layer}.{lay.attn}").sinks.detach().float()
    return torch.sigmoid(torch.logsumexp(scores.float(), -1) - sinks.to(scores.device)[None, :, None])


def run_canaries(model: HookedModel, text: str = CANARY_TEXT, atol: float = 1e-4) -> dict[str, float]:
    """Run the canaries and return their measurements; raise :class:`CanaryError` on failure.

    * ``identity_max_diff``: identity hooks on every layer's residual input change no logit
      (must be exactly 0);
    * ``pattern_row_error``: every attention row sums to 1 (last layer); with attention sinks
      (GPT-OSS) to what the sink leaves, ``sigmoid(logsumexp(scores) - sink)`` per row;
    * ``decode_max_diff``: prefill of all but the last token, then one cached decode step,
      equals the full forward at the last position (within ``atol``).
    """
    n = model.spec.n_layers
    plain = model.run(text)
    identity = [Hook(f"L{l}.resid_pre", lambda t, hook: t) for l in range(n)]
    hooked = model.run(text, interventions=identity)
    identity_diff = float((plain.logits - hooked.logits).abs().max())
    last = model.run(text, collect=[f"L{n - 1}.attn.pattern", f"L{n - 1}.attn.scores"])
    pat = last.acts[f"L{n - 1}.attn.pattern"]
    row_err = float((pat.sum(-1) - _row_sums(model, last.acts[f"L{n - 1}.attn.scores"], n - 1)).abs().max())
    ids = plain.ids
    prefix = model.run(ids[:, :-1])
    step = model.run(ids[:, -1:], past=prefix)
    decode_diff = float((step.logits[:, -1] - plain.logits[:, -1]).abs().max())
    results = {"identity_max_diff": identity_diff, "pattern_row_error": row_err, "decode_max_diff": decode_diff}
    if identity_diff != 0.0:
        raise CanaryError(f"identity hooks changed the logits by {identity_diff:.3g}: {results}")
    if row_err > 1e-5:
        raise CanaryError(f"attention rows do not sum to 1 (error {row_err:.3g}): {results}")
    if decode_diff > atol:
        raise CanaryError(f"cached decode differs from the full forward by {decode_diff:.3g} > {atol}: {results}")
    return results
