"""Per-architecture facts as data.

One :class:`FamilyLayout` row per HF ``model_type`` (the table in
:mod:`notekv.model.families`) says where the modules live; an :class:`ArchSpec` combines that
row with the numbers read off a loaded model's config and
rotary module (head counts, per-layer attention type, per-layer RoPE facts).
Everything model-specific that the hook layer or the KV code needs is looked up here,
never decided by ``if model_type == ...`` elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from torch import nn

from ..errors import InputError, NotekvError
from .families import FAMILIES, LEAN_FAMILIES, RECURRENT_LAYER_TYPES, FamilyLayout  # noqa: F401  (re-exported)


class UnsupportedArchitectureError(NotekvError, ValueError):
    """The model's family is not in the table, or it lacks a module the table names."""


class OutOfRangeError(InputError, IndexError):
    """An index (layer, head, slot) outside what the model or the tensor holds."""


# RoPE scaling types whose rotation is a pure function of the position delta. Dynamic NTK
# recomputes frequencies from the sequence length, so a shifted key is not a rotated key.
# LongRoPE is one while a forward stays below ``original_max_position_embeddings`` (its short
# factors); RopeFacts.switch_at marks where it switches (moves across it are refused).
SHIFT_INVARIANT_ROPE = {"default", "linear", "llama3", "yarn", "longrope_fixed", "longrope"}


@dataclass(frozen=True)
class RopeFacts:
    """RoPE of one layer, as the model applies it.

    ``inv_freq`` are the frequencies after scaling (radians per position, length
    ``rotary_dim // 2``); ``attention_factor`` is the factor folded into cos/sin (YaRN);
    ``pairing`` is ``"half"`` (NeoX/Llama: dim i pairs with i + rotary_dim/2) or
    ``"interleaved"`` (GPT-J, Cohere: 2i pairs with 2i+1). A layer without RoPE (NoPE) has
    ``rotary_dim == 0`` and no frequencies: its keys do not depend on their position.
    ``switch_at`` (LongRoPE): the position from which the model rotates with its long factors;
    ``inv_freq`` are the short ones, valid for keys computed and placed below it.
    """

    rope_type: str
    base: float
    rotary_dim: int
    head_dim: int
    pairing: str
    attention_factor: float
    inv_freq: tuple[float, ...]
    unsupported: str | None = None
    # LongRoPE: a forward whose largest position reaches this rotates every key with other
    # (long) frequencies, so keys are rotations of one another only at positions below it.
    switch_at: int | None = None
    # Key dims before the rotary part (MLA: the un-rotated qk_nope dims); the rotary part is
    # dims ``rotary_offset .. rotary_offset + rotary_dim``.
    rotary_offset: int = 0


@dataclass(frozen=True)
class ArchSpec:
    """Everything notekv needs to know about one loaded model."""

    model_type: str
    layout: FamilyLayout
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention"
    sliding_window: int | None
    rope: tuple[RopeFacts, ...]
    config_hash: str = field(default="")
    attn_logit_softcap: float | None = None  # tanh soft-capping of attention scores (Gemma-2)
    final_logit_softcap: float | None = None  # tanh soft-capping of the logits
    # Mixture of experts: the layers with a routed block (None: every layer where the row
    # names a router, as for a weightless spec), experts per block, experts per token.
    moe_layers: tuple[int, ...] | None = None
    n_experts: int = 0
    experts_per_token: int = 0
    v_head_dim: int | None = None  # value head size where it differs from the key's (MLA)

    @property
    def v_dim(self) -> int:
        """Head size of values (``attn.v``, ``attn.z``, ``kv.v``): ``head_dim`` unless it differs."""
        return self.v_head_dim or self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, q_head: int) -> int:
        """The KV head that query head ``q_head`` reads (HF ``repeat_kv`` order)."""
        if not 0 <= q_head < self.n_heads:
            raise OutOfRangeError(f"q_head={q_head}: query head out of range, the model has {self.n_heads} heads "
                                  f"(0..{self.n_heads - 1})")
        return q_head // self.group_size

    def q_heads_of(self, kv_head: int) -> list[int]:
        """The query heads that read KV head ``kv_head``."""
        if not 0 <= kv_head < self.n_kv_heads:
            raise OutOfRangeError(f"kv_head={kv_head}: KV head out of range, the model has {self.n_kv_heads} KV "
                                  f"heads (0..{self.n_kv_heads - 1})")
        return list(range(kv_head * self.group_size, (kv_head + 1) * self.group_size))

    def attends(self, layer: int) -> bool:
        """Whether ``layer`` has attention and a KV cache (not a hybrid's state-space layer)."""
        return self.layer_types[layer] not in RECURRENT_LAYER_TYPES

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with attention and a KV cache (all but a hybrid's state-space layers)."""
        return tuple(l for l in range(self.n_layers) if self.attends(l))

    @property
    def kv_refusal(self) -> str | None:
        """Why notekv's per-token KV cache (:class:`~notekv.KVCache`) cannot hold this model's
        cache (a hybrid's state-space layers), or None."""
        return state_space_reason(self.model_type) if self.layout.recurrent is not None else None

    def window_of(self, layer: int) -> int | None:
        """Sliding-window size of ``layer`` in tokens, None for global attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def summary(self) -> dict:
        """A JSON-friendly digest (no inverse frequencies)."""
        return {
            "model_type": self.model_type, "n_layers": self.n_layers, "d_model": self.d_model,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "max_positions": self.max_positions, "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope": [{k: v for k, v in asdict(r).items() if k != "inv_freq"} for r in self.rope],
        }


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` with an error that names the family table."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"module {path!r} not found in {type(root).__name__}; the notekv family table "
            f"(FAMILIES in notekv/model/families.py) does not match this model: {err}"
        ) from None


def _rope_params_for(config, layer_type: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type]
    return params


def _rope_facts(model: nn.Module, layout: FamilyLayout, config, layer_type: str, head_dim: int) -> RopeFacts:
    params = _rope_params_for(config, layer_type)
    rope_type = params.get("rope_type", "default")
    rotary = get_submodule(model, layout.rotary)
    inv = getattr(rotary, f"{layer_type}_inv_freq", None)
    factor = getattr(rotary, f"{layer_type}_attention_scaling", None)
    if inv is None:
        # LongRoPE overwrites inv_freq in place after a long forward; its short factors stay
        # in original_inv_freq.
        inv = rotary.original_inv_freq if rope_type == "longrope" else rotary.inv_freq
        factor = getattr(rotary, "attention_scaling", 1.0)
    inv = inv.detach().double().cpu()
    rotary_dim = 2 * inv.numel()
    unsupported = None
    if rope_type not in SHIFT_INVARIANT_ROPE:
        unsupported = (
            f"RoPE type {rope_type!r} is not shift-invariant (its frequencies depend on the "
            "sequence length), so cached keys cannot be repositioned; use a model without "
            f"dynamic scaling. Supported: {sorted(SHIFT_INVARIANT_ROPE)}"
        )
    switch_at = params.get("original_max_position_embeddings") if rope_type == "longrope" else None
    return RopeFacts(
        rope_type=rope_type, base=float(params.get("rope_theta", 10000.0)), rotary_dim=rotary_dim,
        head_dim=head_dim, pairing=layout.rope_pairing,
        attention_factor=float(factor if factor is not None else 1.0),
        inv_freq=tuple(inv.tolist()), unsupported=unsupported,
        switch_at=int(switch_at) if switch_at is not None else None,
    )


def state_space_reason(model_type: str) -> str:
    """Why a hybrid's cache cannot be moved, cut or held as per-token K/V (``model_type`` named)."""
    return (f"{model_type} interleaves state-space (Mamba) layers with its attention layers: a Mamba layer's cache is "
            "one recurrent state (conv window and SSM state) that summarises every token so far, not per-token keys "
            "and values, so it cannot be held as per-token K/V, cut, moved or reassembled; continue from the Run "
            "itself (model.run(ids, past=run)) or recompute the whole context")


#: Why keys cannot be moved, per ``FamilyLayout.positions`` other than "rotary" ({family}: the model type).
POSITION_REFUSALS = {
    "learned": ("moving cached keys to other positions (KVCache.reposition, splice, compose) is impossible on "
                "{family}: it adds learned absolute position embeddings to its token embeddings, so every layer's keys "
                "and values depend on the position each token sat at and no rotation moves them; prefill the text at "
                "the positions it should occupy instead (KVCache.prefill(model, text, offset=...))"),
}


def _unrotated(layout: FamilyLayout, model_type: str, head_dim: int) -> RopeFacts:
    """The RoPE facts of a layer of a family without RoPE: no rotated dims, and why its keys
    cannot be moved (RopeSpec.check raises it); None for keys that do not depend on their
    position at all (``positions="none"`` without state-space layers: a move leaves them as
    they are)."""
    why = state_space_reason(model_type) if layout.recurrent else None
    if why is None and layout.positions in POSITION_REFUSALS:
        why = POSITION_REFUSALS[layout.positions].format(family=model_type)
    return RopeFacts(rope_type=f"none ({layout.positions} positions)", base=0.0, rotary_dim=0, head_dim=head_dim,
                     pairing="half", attention_factor=1.0, inv_freq=(), unsupported=why)


def _no_rope(facts: RopeFacts) -> RopeFacts:
    """The facts of a NoPE layer: no rotated dims (repositioning leaves its keys as they are)."""
    return replace(facts, rope_type="none", rotary_dim=0, inv_freq=(), attention_factor=1.0,
                   unsupported=None, switch_at=None)


def _rope_free_layers(layout: FamilyLayout, config, layer_types: tuple[str, ...]) -> set[int]:
    """Indices of the layers that apply no RoPE (see ``FamilyLayout.nope_layer_type``)."""
    out = {i for i, t in enumerate(layer_types) if t == layout.nope_layer_type}
    if layout.rope_layers_flag is not None:
        flags = getattr(config, layout.rope_layers_flag, None) or [1] * len(layer_types)
        out |= {i for i, has_rope in enumerate(flags) if not has_rope}
    return out


def resolve_layout(layout: FamilyLayout, config) -> FamilyLayout:
    """The row as one model's config switches it: a parallel residual (no resid_mid) where
    ``parallel_residual_flag`` is set, no QK-norm where ``qk_norm_flag`` is off."""
    if layout.parallel_residual_flag and getattr(config, layout.parallel_residual_flag, False):
        layout = replace(layout, resid_mid=None, parallel_residual=True)
    if layout.qk_norm_flag and not getattr(config, layout.qk_norm_flag, False):
        layout = replace(layout, q_norm=None, k_norm=None)
    for flag, name, path in layout.config_paths:
        if getattr(layout.text_config and getattr(config, layout.text_config) or config, flag, None) is None:
            layout = replace(layout, **{name: path})
    return layout


def config_hash(config) -> str:
    """Stable digest of the parts of a config that define the computation."""
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
              "_attn_implementation_autoset", "use_cache", "quantization_config"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _nearest_rows(model: nn.Module, model_type) -> str:
    """``"; its modules match the rows of ..."`` for the family rows whose module paths all
    exist on ``model`` (a starting point for the new row), or ``""``."""
    def fits(lay: FamilyLayout) -> bool:
        try:
            layer = model.get_submodule(f"{lay.layers}.0")
            attn = layer.get_submodule(lay.attn)
            for path in (lay.embed, lay.final_norm, lay.unembed):
                model.get_submodule(path)
            for path in (lay.mlp, lay.ln_attn):
                if path is not None:
                    layer.get_submodule(path)
            for path in (lay.o_proj, lay.q_proj, lay.k_proj, lay.v_proj, lay.qkv_proj, lay.q_norm, lay.k_norm):
                if path is not None:
                    attn.get_submodule(path)
        except (AttributeError, TypeError):
            return False
        return True

    names = [name for name, lay in FAMILIES.items() if fits(lay)]
    if not names:
        return ""
    return (f"; its modules match the rows of {', '.join(names[:4])}: start from "
            f"FAMILIES[{model_type!r}] = FAMILIES[{names[0]!r}] and check its norms, RoPE and residual wiring")


def arch_spec(model: nn.Module) -> ArchSpec:
    """Build the :class:`ArchSpec` of a loaded HF causal LM.

    Raises :class:`UnsupportedArchitectureError` naming the family and the known ones when
    the model type has no row in :data:`FAMILIES`.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no row in notekv's family table; known: "
            f"{sorted(FAMILIES)}. Add a FamilyLayout to FAMILIES in notekv/model/families.py naming its "
            "layers, attention/MLP modules, projections and norms" + _nearest_rows(model, model_type)
            + ", then run `notekv check` on the model to see which operations are exact on it."
        )
    layout = resolve_layout(FAMILIES[model_type], config)
    for path in (layout.layers, layout.embed, layout.final_norm, layout.unembed, layout.rotary):
        if path is not None:
            get_submodule(model, path)
    if layout.text_config:  # a multimodal wrapper: the numbers are the language model's
        config = getattr(config, layout.text_config)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if layout.qk_head_dims:
        head_dim = sum(int(getattr(config, f)) for f in layout.qk_head_dims)
    n_layers = config.num_hidden_layers
    sliding = getattr(config, "sliding_window", None)
    # Without layer_types, a config's sliding window applies to every layer (as HF's masks
    # and caches read it: Mistral, Phi-3, Starcoder2).
    default_type = "sliding_attention" if sliding is not None else "full_attention"
    layer_types = tuple(getattr(config, "layer_types", None) or [default_type] * n_layers)
    rope_by_type = {t: _rope_facts(model, layout, config, t, head_dim) if layout.positions == "rotary"
                    else _unrotated(layout, model_type, head_dim) for t in set(layer_types)}
    nope = _rope_free_layers(layout, config, layer_types)
    if layout.rotary_offset_field:
        offset = int(getattr(config, layout.rotary_offset_field))
        rope_by_type = {t: replace(r, rotary_offset=offset) for t, r in rope_by_type.items()}
    if "sliding_attention" not in layer_types:
        sliding = None
    return ArchSpec(
        model_type=model_type, layout=layout, n_layers=n_layers, d_model=config.hidden_size,
        n_heads=n_heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, vocab_size=config.vocab_size,
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        layer_types=layer_types, sliding_window=sliding,
        rope=tuple(_no_rope(rope_by_type[t]) if i in nope else rope_by_type[t] for i, t in enumerate(layer_types)),
        config_hash=config_hash(model.config),
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None) or None,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) or None,
        **_moe_facts(model, layout, config, n_layers),
        v_head_dim=int(getattr(config, layout.v_head_dim_field)) if layout.v_head_dim_field else None,
    )


def _moe_facts(model: nn.Module, layout: FamilyLayout, config, n_layers: int) -> dict:
    """``moe_layers``, ``n_experts`` (rows of the router's weight) and ``experts_per_token``
    (the config's ``num_experts_per_tok``) of a family with a router; {} for a dense one."""
    if layout.router is None:
        return {}
    routers = {}
    for l in range(n_layers):
        try:
            routers[l] = model.get_submodule(f"{layout.layers}.{l}.{layout.router}")
        except AttributeError:  # a dense layer of an MoE model (Qwen-MoE's mlp_only_layers)
            continue
    first = next(iter(routers.values()), None)
    return {"moe_layers": tuple(routers), "n_experts": int(first.weight.shape[0]) if first is not None else 0,
            "experts_per_token": int(getattr(config, "num_experts_per_tok", 0) or 0)}
