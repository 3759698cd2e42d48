"""The decision step as the graph sees it: per-head reads of the cache, frozen queries, and a
readout that recomputes the rest of the step.

One OLD decision step is run once and its per-layer decision query ``q`` (post-RoPE), the
decision token's own key and value, the masked attention scores and the per-head outputs
``z`` are kept (:class:`Decision`). A *circuit* says, for every query head ``(l, h)``, which
cached cells it reads at NEW's K/V (the rest at OLD's) and whether its output reaches the
logits; the head's output is then recomputed in closed form with its query frozen at OLD
(:func:`head_z`), exactly the attention the model computes when nothing below the head
changed. The readout (:func:`readout`) runs the decision token with every head's output at
every layer replaced by these values (path patching: heads never see each other's changes;
MLPs and norms recompute), so a whole circuit costs one batch row of a one-token forward,
whatever the context length.

Shapes: ``L`` layers, ``Hq`` query heads, ``Hkv`` KV heads, ``S`` cached slots (the decision
token is slot ``S``), ``C = S - first`` cells from the first field slot on, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from ..errors import InputError
from ..hooks.grad import Tap
from ..hooks.interventions import Collect, Patch
from ..hooks.positions import Pos
from ..hooks.sitemap import UnsupportedError
from ..kv import KVCache
from ..model.arch import get_submodule
from ..model.attnmath import scaled_scores, scaling_of
from ..runner import progress_bar

ROWS = 128  # readout rows per forward (one token each, no cache: memory is small)


@dataclass
class Decision:
    """OLD's decision step, kept for recomputing head outputs. Tensors are float32 (float64
    for a float64 model) on the model's device; ``first`` is the first field slot (cells are
    slots ``first..S-1``)."""

    token: int
    good: int
    bad: int
    first: int
    q: Float[torch.Tensor, "L Hq D"]
    k_old: Float[torch.Tensor, "L Hkv S D"]
    v_old: Float[torch.Tensor, "L Hkv S D"]
    k_new: Float[torch.Tensor, "L Hkv S D"]
    v_new: Float[torch.Tensor, "L Hkv S D"]
    k_self: Float[torch.Tensor, "L Hkv D"]
    v_self: Float[torch.Tensor, "L Hkv D"]
    scores: Float[torch.Tensor, "L Hq S1"]  # OLD's masked pre-softmax scores (S + 1: the decision's own key last)
    z_old: Float[torch.Tensor, "L Hq D"]
    scaling: tuple[float, ...]
    softcap: float | None
    group: int
    s_old: float  # logit[good] - logit[bad] of the OLD decision step
    sinks: Float[torch.Tensor, "L Hq"] | None = None  # attention-sink logits (GPT-OSS): a key without a value

    @property
    def n_layers(self) -> int:
        return self.q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]

    @property
    def n_slots(self) -> int:
        return self.k_old.shape[2]

    @property
    def n_cells(self) -> int:
        return self.n_slots - self.first

    def rep(self, x: torch.Tensor) -> torch.Tensor:
        """KV-head tensors ``[Hkv, ...]`` repeated to query heads ``[Hq, ...]`` (GQA order)."""
        return x.repeat_interleave(self.group, dim=0)

    def new_scores(self, l: int) -> Float[torch.Tensor, "Hq C"]:
        """Layer ``l``'s decision-query scores against NEW's keys at the cells."""
        k = self.rep(self.k_new[l, :, self.first:])
        return scaled_scores(torch.einsum("hd,hcd->hc", self.q[l], k), self.scaling[l], self.softcap)

    def old_cell_scores(self, l: int) -> Float[torch.Tensor, "Hq C"]:
        k = self.rep(self.k_old[l, :, self.first:])
        return scaled_scores(torch.einsum("hd,hcd->hc", self.q[l], k), self.scaling[l], self.softcap)


def check_model(model) -> None:
    """Refuse models the graph cannot read: a layer without a KV cache (hybrids)."""
    spec = model.spec
    if spec.kv_refusal or len(spec.attention_layers) != spec.n_layers:
        raise UnsupportedError(f"{model.name}: the notes graph needs attention with a KV cache at every layer "
                               f"({spec.kv_refusal or 'some layers have none'}); use a transformer family")


@torch.no_grad()
def decision(model, old: KVCache, new: KVCache, token: int, good: int, bad: int, first: int) -> Decision:
    """Run OLD's decision step once and keep what :func:`head_z` needs. ``old``/``new``:
    batch-1 caches of the context (``S`` slots, aligned); ``first``: the first field slot."""
    check_model(model)
    spec, L = model.spec, old.n_layers
    if old.keys.shape[1] != 1 or new.keys.shape != old.keys.shape:
        raise InputError("old and new must be batch-1 caches of the same shape (one aligned pair)")
    S = len(old)
    if not 0 <= first < S:
        raise InputError(f"first={first}: the first field slot must lie in the cached context 0..{S - 1}")
    sites = [f"L{l}.{s}" for l in range(L) for s in ("attn.q", "attn.scores", "kv.k", "kv.v", "attn.z")]
    run = model.run(torch.tensor([[token]]), past=old, collect=sites, logits="last")
    work = torch.promote_types(old.keys.dtype, torch.float32)
    dev = model.device
    f = lambda x: x.to(device=dev, dtype=work)  # noqa: E731
    q = torch.stack([f(run[f"L{l}.attn.q"][0, :, -1]) for l in range(L)])
    scores = torch.stack([f(run[f"L{l}.attn.scores"][0, :, -1, : S + 1]) for l in range(L)])
    k_self = torch.stack([f(run[f"L{l}.kv.k"][0, :, S]) for l in range(L)])
    v_self = torch.stack([f(run[f"L{l}.kv.v"][0, :, S]) for l in range(L)])
    z_old = torch.stack([f(run[f"L{l}.attn.z"][0, :, -1]) for l in range(L)])
    lay = spec.layout
    scaling = tuple(scaling_of(get_submodule(model.hf, f"{lay.layers}.{l}.{lay.attn}"), spec) for l in range(L))
    logits = run.logits[0, -1].float()
    sinks = None
    if getattr(lay, "attn_sinks", False):
        sinks = torch.stack([f(get_submodule(model.hf, f"{lay.layers}.{l}.{lay.attn}").sinks.detach()) for l in range(L)])
    return Decision(token=token, good=good, bad=bad, first=first, q=q, k_old=f(old.keys[:, 0]),
                    v_old=f(old.values[:, 0]), k_new=f(new.keys[:, 0]), v_new=f(new.values[:, 0]), k_self=k_self,
                    v_self=v_self, scores=scores, z_old=z_old, scaling=scaling, softcap=spec.attn_logit_softcap,
                    group=spec.group_size, s_old=float(logits[good] - logits[bad]), sinks=sinks)


def head_z(dec: Decision, reads: Bool[torch.Tensor, "R L Hq C"]) -> Float[torch.Tensor, "R L Hq D"]:
    """Each head's decision output when it reads NEW's K/V at the cells ``reads`` marks and
    OLD's elsewhere, its query (and the decision token's own key and value) as in OLD's step."""
    R, L = reads.shape[0], dec.n_layers
    out = []
    for l in range(L):
        out.append(_layer_z(dec, l, reads[:, l].to(dec.q.device)))
    return torch.stack(out, 1) if L else dec.z_old.new_zeros(R, 0, dec.n_heads, dec.q.shape[-1])


def _layer_z(dec: Decision, l: int, m: torch.Tensor) -> torch.Tensor:
    """``[R, Hq, D]``: layer ``l``'s head outputs for read masks ``m [R, Hq, C]``."""
    c0 = dec.first
    sc = dec.scores[l].expand(m.shape[0], -1, -1).clone()  # [R, Hq, S+1]
    cells = sc[..., c0: dec.n_slots]
    visible = cells > torch.finfo(sc.dtype).min / 2
    moved = torch.where(m, cells + (dec.new_scores(l) - dec.old_cell_scores(l)), cells)
    sc[..., c0: dec.n_slots] = torch.where(visible, moved, cells)
    a = attention_weights(dec, l, sc)
    v_old, dv = dec.rep(dec.v_old[l]), dec.rep(dec.v_new[l, :, c0:] - dec.v_old[l, :, c0:])
    z = torch.einsum("rhs,hsd->rhd", a[..., : dec.n_slots], v_old)
    z = z + a[..., dec.n_slots:] * dec.rep(dec.v_self[l])[None]
    return z + torch.einsum("rhc,hcd->rhd", a[..., c0: dec.n_slots] * m, dv)


def attention_weights(dec: Decision, l: int, sc: torch.Tensor) -> torch.Tensor:
    """Softmax of scores ``[R, Hq, S + 1]``, with layer ``l``'s attention sink (a key without
    a value) in the normaliser where the family has one."""
    if dec.sinks is None:
        return torch.softmax(sc, -1)
    sink = dec.sinks[l][None, :, None].expand(sc.shape[0], -1, 1)
    return torch.softmax(torch.cat([sc, sink], -1), -1)[..., :-1]


def with_sink(dec: Decision, l: int, sc: torch.Tensor) -> torch.Tensor:
    """Scores ``[B, Hq, S + 1]`` with layer ``l``'s sink logit appended (unchanged without one)."""
    if dec.sinks is None:
        return sc
    return torch.cat([sc, dec.sinks[l][None, :, None].expand(sc.shape[0], -1, 1)], -1)


def interpolated_z(dec: Decision, l: int, alpha: torch.Tensor):
    """Layer ``l``'s head outputs ``[R, Hq, D]`` with every cell's K/V a fraction ``alpha [R]``
    of the way from OLD's to NEW's, and the per-query-head K/V leaves ``(k, v)`` ``[R, Hq, C,
    D]`` it is differentiable in (each query head reads its own copy, so a gradient there is
    that head's alone)."""
    c0, S = dec.first, dec.n_slots
    a = alpha.to(dec.q)[:, None, None, None]
    k0, k1 = dec.rep(dec.k_old[l, :, c0:]), dec.rep(dec.k_new[l, :, c0:])
    v0, v1 = dec.rep(dec.v_old[l, :, c0:]), dec.rep(dec.v_new[l, :, c0:])
    k = (k0 + a * (k1 - k0)).detach().requires_grad_(True)
    v = (v0 + a * (v1 - v0)).detach().requires_grad_(True)
    base = dec.scores[l].expand(len(alpha), -1, -1)
    cells = base[..., c0:S]
    visible = cells > torch.finfo(base.dtype).min / 2
    fresh = scaled_scores(torch.einsum("hd,rhcd->rhc", dec.q[l], k), dec.scaling[l], dec.softcap)
    fresh = cells + (fresh - dec.old_cell_scores(l)[None])  # equal to OLD's scores at alpha = 0
    sc = torch.cat([base[..., :c0], torch.where(visible, fresh, cells), base[..., S:]], -1)
    att = attention_weights(dec, l, sc)
    z = torch.einsum("rhs,hsd->rhd", att[..., :c0], dec.rep(dec.v_old[l, :, :c0]))
    z = z + torch.einsum("rhc,rhcd->rhd", att[..., c0:S], v)
    z = z + att[..., S:] * dec.rep(dec.v_self[l])[None]
    return z, k, v


def _patches(dec: Decision, z: torch.Tensor, taps: bool) -> list:
    out = []
    for l in range(dec.n_layers):
        out.append(Patch(f"L{l}.attn.z", z[:, l, :, None, :], at=Pos(0)))
        if taps:
            out.append(Tap(f"L{l}.attn.z"))
    return out


def _forward(model, dec: Decision, z: torch.Tensor, grad: bool):
    ids = torch.full((z.shape[0], 1), dec.token, dtype=torch.long)
    return model.run(ids, positions=dec.n_slots, interventions=_patches(dec, z.to(model.dtype), grad),
                     logits="last", grad=grad)


@torch.no_grad()
def readout(model, dec: Decision, z: Float[torch.Tensor, "R L Hq D"], *, progress: bool = False,
            desc: str = "readout") -> Float[torch.Tensor, "R"]:
    """``logit[good] - logit[bad]`` (float64, CPU) of the decision step with every head's
    output replaced by ``z``: heads frozen, MLPs and norms recomputed."""
    out = torch.empty(z.shape[0], dtype=torch.float64)
    for start in progress_bar(range(0, z.shape[0], ROWS), progress=progress, desc=desc, leave=False):
        lg = _forward(model, dec, z[start: start + ROWS], grad=False).logits[:, -1].float()
        out[start: start + ROWS] = (lg[:, dec.good] - lg[:, dec.bad]).double().cpu()
    return out


@torch.enable_grad()
def readout_grad(model, dec: Decision, z: Float[torch.Tensor, "R L Hq D"]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s [R], d s / d z [R, L, Hq, D])`` at head outputs ``z`` (heads frozen: the gradient
    reaches each head's output only through the MLPs and norms after it, never through another
    head's query, key or value)."""
    s_all, g_all = [], []
    for start in range(0, z.shape[0], ROWS):
        part = z[start: start + ROWS].detach()
        run = _forward(model, dec, part, grad=True)
        lg = run.logits[:, -1]
        s = lg[:, dec.good] - lg[:, dec.bad]
        grads = run.grads(s.float().sum())
        g_all.append(torch.stack([grads[f"L{l}.attn.z"][:, :, -1] for l in range(dec.n_layers)], 1).to(dec.q))
        s_all.append(s.detach().double().cpu())
    return torch.cat(s_all), torch.cat(g_all)
