"""One check per capability, each measured against a reference computed without notekv.

Every check takes a :class:`Probe` (the model and the prompts it is tried on) and returns
the largest error it measured (relative to the reference's scale), or raises:
:class:`~notekv.model.arch.UnsupportedArchitectureError` / :class:`~notekv.hooks.sitemap.UnsupportedError`
when the family refuses the operation (a "refused" cell), :class:`CheckFailed` when notekv's
result and the reference disagree. References are plain transformers forwards with plain
PyTorch hooks, hand-built ``DynamicCache`` objects and explicit position ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import NotekvError
from ..hooks.interventions import Ablate, Knockout, KVPatch, Patch, Steer
from ..hooks.positions import Last, Pos
from ..kv import KVCache
from ..model.arch import get_submodule

#: Largest relative error of a parity or intervention check (float32 on both sides; the
#: model's own kernels on one side, hooks or a hand-built cache on the other).
PARITY_TOL = 1e-4
#: Largest relative error, per layer, of a repositioned key against a prefill at the target
#: positions (the exactness of one rotation in float32).
SHIFT_TOL = 1e-5
#: Offsets the shift check draws from (1 .. SHIFT_RANGE). The model's own rotary rounds
#: ``position x frequency`` to float32, a relative error of about 1.3e-8 per position; up to
#: 512 positions it stays well under SHIFT_TOL, so what is measured is notekv's rotation.
SHIFT_RANGE = 512
#: Sizes of the value perturbation of the attribution check, relative to the mean |value|.
#: The exact effect is measured as the central difference of patching +eps and -eps, which
#: cancels the second-order term; what is left is third order (it grows as eps^2: OLMo-2's
#: post-norms reach 7e-2 at 1e-2 but 8e-3 at 3e-3) and float32 noise (it shrinks as 1/eps:
#: SmolLM2 reaches 1.1e-2 at 3e-3 but 4e-3 at 1e-2). The check keeps the better of the two
#: sizes: the linear regime is wherever neither dominates.
EPS = (1e-2, 3e-3)
#: Largest relative error ``||estimate - exact|| / ||exact||`` of the attribution check.
LINEAR_TOL = 2e-2


class CheckFailed(NotekvError, AssertionError):
    """notekv's result differs from the reference (the message gives both and the error)."""


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` in float64 (0 when both are zero)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise CheckFailed(f"shapes differ: notekv {tuple(got.shape)} vs reference {tuple(ref.shape)}")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def rel_norm(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (Frobenius, float64): the relative error of a whole tensor."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise CheckFailed(f"shapes differ: notekv {tuple(got.shape)} vs reference {tuple(ref.shape)}")
    scale = float(ref.norm())
    return float((got - ref).norm()) / scale if scale > 0 else float((got - ref).norm())


def _within(name: str, err: float, tol: float) -> float:
    if not err <= tol:  # also catches NaN
        raise CheckFailed(f"{name}: relative error {err:.3g} > {tol:g}")
    return err


@dataclass
class Probe:
    """The model and the token ids every check runs on.

    ``ids`` ``[1, S]``: a prompt with BOS; ``other`` ``[1, S]``: a second prompt of the same
    length (the patch source); ``S`` stays inside the smallest sliding window so that
    references built from a shortened cache see the same keys.
    """

    model: object
    ids: torch.Tensor
    other: torch.Tensor
    text: str
    rng: torch.Generator
    seed: int

    @classmethod
    def of(cls, model, seed: int, length: int = 8) -> "Probe":
        spec = model.spec
        windows = [spec.window_of(l) for l in range(spec.n_layers)]
        windows = [w for w in windows if w]
        n = min([length] + [w - 1 for w in windows])
        gen = torch.Generator().manual_seed(seed)
        vocab = min(spec.vocab_size, 256)
        bos = getattr(model.tokenizer, "bos_token_id", None)
        first = torch.tensor([[bos if bos is not None else 1]])

        def prompt():
            return torch.cat([first, torch.randint(3, vocab, (1, n - 1), generator=gen)], 1)

        letters = "abcdefghijklmnopqrstuvwxyz"
        text = " " + "".join(letters[int(i)] for i in torch.randint(0, 26, (5,), generator=gen))
        return cls(model, prompt(), prompt(), text, gen, seed)

    def answers(self) -> tuple[int, int]:
        """Two distinct token ids whose logit difference the decision checks score."""
        good = int(self.ids[0, 1])
        return good, int(self.ids[0, 2]) if int(self.ids[0, 2]) != good else (good + 1) % min(self.spec.vocab_size, 256)

    @property
    def hf(self):
        return self.model.hf

    @property
    def spec(self):
        return self.model.spec

    def layer(self, l: int):
        return get_submodule(self.hf, f"{self.spec.layout.layers}.{l}")

    def attention_layers(self) -> list[int]:
        """Layers whose attention notekv reaches (every layer but a hybrid's state-space ones)."""
        names = set(self.model.sitemap.names())
        return [l for l in range(self.spec.n_layers) if f"L{l}.attn.z" in names]

    def hf_forward(self, ids: torch.Tensor, **kw):
        """The plain HF forward of ``ids`` (moved to the model's device, as notekv moves them)."""
        with torch.no_grad():
            return self.hf(input_ids=ids.to(self.model.device), use_cache=True, **kw)


def _hooked_logits(p: Probe, hooks) -> torch.Tensor:
    """HF logits of ``p.ids`` with plain PyTorch hooks registered for the one forward:
    ``hooks`` are ``(module, kind, fn)`` with kind ``"pre"`` (a kwargs pre-hook), ``"pre_args"``
    (a positional pre-hook) or ``"post"`` (a forward hook)."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "post":
                handles.append(module.register_forward_hook(fn))
            else:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=kind == "pre"))
        return p.hf_forward(p.ids).logits
    finally:
        for h in handles:
            h.remove()


def _hf_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CheckFailed(f"the model's own cache is a {type(cache).__name__} without per-layer K/V; "
                          "no hand-built reference for this check")
    return layers


def _rebuilt(cache, edit) -> object:
    """A copy of the model's own ``cache`` whose attention layers hold
    ``edit(layer_index, keys, values) -> (keys, values)`` (a hand-built reference cache);
    layers without per-token K/V (a hybrid's state-space layers) are copied as they are."""
    import copy

    _hf_layers(cache)
    out = copy.deepcopy(cache)
    for l, layer in enumerate(out.layers):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            layer.keys, layer.values = (t.clone() for t in edit(l, layer.keys, layer.values))
    return out


# ---------------------------------------------------------------------------- checks
def check_sites(p: Probe) -> float:
    """Every site of the model collects; residual stream, logits and cache equal HF's own
    ``hidden_states``, logits and ``past_key_values``."""
    m = p.model
    names = m.sitemap.names()
    run = m.run(p.ids, collect=names)
    missing = [n for n in names if n not in run.acts]
    if missing:
        raise CheckFailed(f"sites listed but not collected: {missing[:5]}")
    ref = p.hf_forward(p.ids, output_hidden_states=True)
    hs = ref.hidden_states
    errs = [rel_err(run.logits, ref.logits)]
    for l in range(p.spec.n_layers):
        errs.append(rel_err(run.acts[f"L{l}.resid_pre"], hs[l]))
    layers = getattr(ref.past_key_values, "layers", None) or []
    for l, layer in enumerate(layers):
        keys = getattr(layer, "keys", None)
        if f"L{l}.kv.k" not in run.acts or not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            continue
        values = layer.values
        expand = p.spec.layout.kv_expand
        if expand is not None:  # a latent cache (MLA): per-head K/V by the module's own expansion
            attn = get_submodule(p.layer(l), p.spec.layout.attn)
            keys, values = getattr(type(attn), expand)(attn, keys, values)
        n = keys.shape[2]  # a sliding layer of HF's cache may keep only the last slots
        errs.append(rel_err(run.acts[f"L{l}.kv.k"][..., -n:, :], keys))
        errs.append(rel_err(run.acts[f"L{l}.kv.v"][..., -n:, :], values))
    return _within("sites vs HF", max(errs), PARITY_TOL)


def check_patch(p: Probe) -> float:
    """``Patch`` of ``resid_pre`` at one position from another prompt vs a pre-hook that
    writes the other prompt's hidden state there."""
    m, l = p.model, p.spec.n_layers // 2
    j = p.ids.shape[1] // 2
    src = m.run(p.other, collect=[f"L{l}.resid_pre"])
    got = m.run(p.ids, interventions=[Patch(f"L{l}.resid_pre", src, at=Pos(j))]).logits
    donor = p.hf_forward(p.other, output_hidden_states=True).hidden_states[l]

    def pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, j] = donor[:, j]
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    ref = _hooked_logits(p, [(p.layer(l), "pre", pre)])
    return _within("Patch vs hand reference", rel_err(got, ref), PARITY_TOL)


def check_steer(p: Probe) -> float:
    """``Steer`` of ``resid_post`` vs a forward hook adding the vector to the layer output."""
    m, l = p.model, max(0, p.spec.n_layers // 2 - 1)
    vec = torch.randn(p.spec.d_model, generator=p.rng)
    got = m.run(p.ids, interventions=[Steer(f"L{l}.resid_post", vec, scale=0.5)]).logits

    def post(module, args, out):
        if isinstance(out, tuple):
            return (out[0] + 0.5 * vec.to(out[0]),) + tuple(out[1:])
        return out + 0.5 * vec.to(out)

    ref = _hooked_logits(p, [(p.layer(l), "post", post)])
    return _within("Steer vs hand reference", rel_err(got, ref), PARITY_TOL)


def check_ablate(p: Probe) -> float:
    """``Ablate`` (zero) of one query head's ``attn.z`` vs a pre-hook zeroing that head's slice
    of the output projection's input."""
    m = p.model
    l = p.attention_layers()[-1]
    z = m.run(p.ids, collect=[f"L{l}.attn.z"]).acts[f"L{l}.attn.z"]
    dv = z.shape[-1]
    h = p.spec.n_heads - 1
    got = m.run(p.ids, interventions=[Ablate(f"L{l}.attn.z.h{h}", kind="zero")]).logits
    lay = p.spec.layout
    o_proj = get_submodule(p.layer(l), f"{lay.attn}.{lay.o_proj}")

    def pre(module, args):
        x = args[0].clone()
        x[..., h * dv : (h + 1) * dv] = 0
        return (x,) + tuple(args[1:])

    ref = _hooked_logits(p, [(o_proj, "pre_args", pre)])
    return _within("Ablate vs hand reference", rel_err(got, ref), PARITY_TOL)


def _decode_last(p: Probe, cache, ids: torch.Tensor) -> torch.Tensor:
    """HF logits of the last token of ``ids`` decoded against ``cache`` at its true position."""
    s = ids.shape[1]
    with torch.no_grad():
        out = p.hf(input_ids=ids[:, -1:].to(p.model.device), past_key_values=cache, use_cache=True,
                   position_ids=torch.tensor([[s - 1]], device=p.model.device))
    return out.logits[:, -1]


def check_knockout(p: Probe) -> float:
    """``Knockout`` of one key for the last query in every layer vs a pre-hook on every
    attention module that blocks that cell in the mask the module receives (written out
    from the causal rule and the layer's window when the model passes none)."""
    m, ids = p.model, p.ids
    s = ids.shape[1]
    k = 1 + int(torch.randint(0, s - 2, (1,), generator=p.rng))
    got = m.run(ids, interventions=[Knockout(src=Pos(k), dst=Last())]).logits[:, -1]
    lay = p.spec.layout

    def blocker(window):
        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None:
                hidden = args[0] if args else kwargs["hidden_states"]
                q, key = torch.arange(s)[:, None], torch.arange(s)[None, :]
                mask = (key <= q) & ((q - key < window) if window else True)
                mask = mask[None, None].to(hidden.device)
            mask = mask.clone()
            mask[..., -1, k] = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            return args, {**kwargs, "attention_mask": mask}
        return pre

    ref = _hooked_logits(p, [(get_submodule(p.layer(l), lay.attn), "pre", blocker(p.spec.window_of(l)))
                             for l in p.attention_layers()])[:, -1]
    return _within("Knockout vs hand reference", rel_err(got, ref), PARITY_TOL)


def _prefix_caches(p: Probe) -> tuple[KVCache, KVCache]:
    m = p.model
    return (KVCache.prefill(m, p.ids[:, :-1]), KVCache.prefill(m, p.other[:, :-1]))


def check_kv_patch(p: Probe) -> float:
    """``KVPatch`` of one slot's K/V from another prompt's cache vs decoding on a hand-built
    cache holding that slot's K/V."""
    m, ids = p.model, p.ids
    k = 1 + int(torch.randint(0, ids.shape[1] - 2, (1,), generator=p.rng))
    old, new = _prefix_caches(p)
    got = m.run(ids[:, -1:], past=old, interventions=[KVPatch(new, at=Pos(k))]).logits[:, -1]
    a = p.hf_forward(ids[:, :-1]).past_key_values
    b = _hf_layers(p.hf_forward(p.other[:, :-1]).past_key_values)

    def swap(l, K, V):
        K, V = K.clone(), V.clone()
        K[:, :, k], V[:, :, k] = b[l].keys[:, :, k], b[l].values[:, :, k]
        return K, V

    ref = _decode_last(p, _rebuilt(a, swap), ids)
    return _within("KVPatch vs hand reference", rel_err(got, ref), PARITY_TOL)


def check_runner(p: Probe) -> float:
    """The batched runner's KV-mix rows (every path it picks) vs one ``model.run`` with a
    ``KVPatch`` per row."""
    from ..runner import KVMix, logit_diff, run_variants

    m, ids = p.model, p.ids
    old, new = _prefix_caches(p)
    L, S = p.spec.n_layers, old.keys.shape[3]
    masks = torch.zeros(3, L, S, dtype=torch.bool)
    masks[0, :, S // 2] = True
    masks[1, 0, :] = True
    masks[2, L - 1, 1:] = True
    good, bad = p.answers()
    metric = logit_diff(good, bad)
    got = run_variants(m, ids[0, -1:], KVMix.of_slots(new, masks), metric, past=old)
    refs = []
    for row in masks:
        ivs = [KVPatch(new, at=Pos(torch.nonzero(row[l]).flatten().tolist()), layers=[l])
               for l in range(L) if bool(row[l].any())]
        logits = m.run(ids[:, -1:], past=old, interventions=ivs).logits[:, -1].float()
        refs.append(float(metric(logits)[0]))
    return _within("runner vs per-row KVPatch", rel_err(got, torch.tensor(refs, dtype=torch.float64)), PARITY_TOL)


def check_attribution(p: Probe) -> float:
    """KV attribution of a small value perturbation vs its exact first-order effect (the
    central difference of exact patching at +/- the perturbation) on every cell of the first
    and last attention layer, ``||estimate - exact|| / ||exact||``, at the better of the
    perturbation sizes :data:`EPS`."""
    from ..attribution.exact import exact_kv
    from ..attribution.kv import attribute_kv

    m, ids = p.model, p.ids
    old, _ = _prefix_caches(p)
    noise = torch.randn(old.values.shape, generator=p.rng).to(old.values) * old.values.abs().mean()
    token, (good, bad) = int(ids[0, -1]), p.answers()
    layers = p.attention_layers()
    S = old.keys.shape[3]
    cells = [(l, s, h) for l in (layers[0], layers[-1]) for s in range(S) for h in range(p.spec.n_kv_heads)]
    errs = []
    for eps in EPS:
        plus = dataclasses.replace(old, values=old.values + eps * noise)
        minus = dataclasses.replace(old, values=old.values - eps * noise)
        est = attribute_kv(m, old, plus, token, good, bad).v[0]  # [L, H, S]
        exact = (exact_kv(m, old, plus, token, good, bad, cells, which="v")
                 - exact_kv(m, old, minus, token, good, bad, cells, which="v")) / 2
        approx = torch.tensor([float(est[l, h, s]) for l, s, h in cells], dtype=torch.float64)
        errs.append(rel_norm(approx, exact))
    if not min(errs) <= LINEAR_TOL:
        raise CheckFailed("attribution (linear regime) vs exact: relative error "
                          + ", ".join(f"{e:.3g} at eps {eps:g}" for e, eps in zip(errs, EPS)) + f" > {LINEAR_TOL:g}")
    return min(errs)


def check_shift(p: Probe) -> float:
    """A prefill at a random offset ``d`` repositioned by ``-d`` vs the offset-0 prefill, per
    layer, ``||moved - base|| / ||base||``. Values are never moved: their difference is the
    model's own float32 noise of computing at another position (its rotary rounds
    ``position x frequency``), which also reaches the keys of deeper layers. Each layer's keys
    must match within SHIFT_TOL beyond that layer's value noise (on the families' tiny models
    that noise stays below 1e-6 up to SHIFT_RANGE; a 30-layer model's deep layers reach 1e-5)."""
    m = p.model
    room = min(p.spec.max_positions or SHIFT_RANGE, SHIFT_RANGE + p.ids.shape[1]) - p.ids.shape[1]
    d = 1 + int(torch.randint(0, max(room, 1), (1,), generator=p.rng))
    moved = KVCache.prefill(m, p.ids, offset=d).reposition(-d)
    base = KVCache.prefill(m, p.ids)
    worst = 0.0
    for l in range(p.spec.n_layers):
        floor = rel_norm(moved.values[l], base.values[l])
        err = rel_norm(moved.keys[l], base.keys[l])
        if not err <= SHIFT_TOL + floor:
            raise CheckFailed(f"shift by {d}: keys of layer {l} off by {err:.3g} > {SHIFT_TOL:g} + the model's own "
                              f"noise there ({floor:.3g}, its values)")
        worst = max(worst, err)
    return worst


def check_splice(p: Probe) -> float:
    """``splice``: a chunk placed first then text equals the full prefill (seam-free); a chunk
    moved behind text equals the chunk prefilled at the slots it lands on (one rotation)."""
    from ..kv.splice import splice

    m = p.model
    head = KVCache.prefill(m, p.ids)
    joined = splice(m, [head, p.text])
    full = KVCache.prefill(m, joined.token_ids[None])
    errs = [rel_err(joined.keys, full.keys), rel_err(joined.values, full.values)]
    chunk = KVCache.prefill(m, p.other[:, 1:])
    moved = splice(m, [p.text, chunk])
    n = len(moved) - len(chunk)
    landed = KVCache.prefill(m, p.other[:, 1:], offset=n)
    errs += [rel_err(moved.keys[..., n:, :], landed.keys), rel_err(moved.values[..., n:, :], landed.values)]
    return _within("splice vs recompute", max(errs), PARITY_TOL)


def check_compose(p: Probe) -> float:
    """``compose`` of a prefix and a skill, continued by a suffix, vs ``splice`` of the same
    parts and a plain continuation (both exact moves; compose adds the skill bookkeeping)."""
    from ..compose import Skill, compose
    from ..kv.splice import splice

    m = p.model
    skill = Skill.compile(m, p.text, mode="isolated", name="probe")
    prefix = KVCache.prefill(m, p.ids)
    suffix = p.ids[0, 1:4].tolist()
    got = compose(m, prefix, [skill], suffix, logits="last", engine="hf")
    ref_cache = splice(m, [prefix, skill.cache])
    ref = m.run(torch.tensor([suffix]), past=ref_cache, logits="last").logits[:, -1]
    logits = got.logits[:, -1] if got.logits.dim() == 3 else got.logits
    return _within("compose vs splice", rel_err(logits, ref), PARITY_TOL)


def _backend_check(p: Probe, make) -> float:
    m = p.model
    sites = [f"L0.resid_post", f"L{p.spec.n_layers - 1}.resid_pre"]
    native = m.run(p.ids, collect=sites)
    run = make(m).run(p.ids, collect=sites)
    errs = [rel_err(run.acts[s], native.acts[s]) for s in sites] + [rel_err(run.logits, native.logits)]
    # The bridge computes eager attention and the model may run SDPA: float rounding only.
    return _within("backend vs native", max(errs), 1e-3)


def check_tl(p: Probe) -> float:
    """The TransformerLens backend's residual stream and logits vs ``model.run``."""
    from ..backends.tl import TLBackend

    return _backend_check(p, TLBackend)


def check_nnsight(p: Probe) -> float:
    """The nnsight backend's residual stream and logits vs ``model.run``."""
    from ..backends.nnsight import NNsightBackend

    return _backend_check(p, NNsightBackend)


#: The capability columns, in the order the matrix prints them.
CHECKS = {
    "sites": check_sites, "Patch": check_patch, "Steer": check_steer, "Ablate": check_ablate,
    "Knockout": check_knockout, "KVPatch": check_kv_patch, "runner": check_runner,
    "attribution": check_attribution, "shift": check_shift, "splice": check_splice,
    "compose": check_compose, "TL": check_tl, "nnsight": check_nnsight,
}
