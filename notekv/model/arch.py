"""Per-architecture facts as data.

One :class:`FamilyLayout` row per HF ``model_type`` says where the modules live; an
:class:`ArchSpec` combines that row with the numbers read off a loaded model's config and
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


class UnsupportedArchitectureError(NotekvError, ValueError):
    """The model's family is not in the table, or it lacks a module the table names."""


class OutOfRangeError(InputError, IndexError):
    """An index (layer, head, slot) outside what the model or the tensor holds."""


@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of one model family, relative to the ``*ForCausalLM`` module.

    Per-layer paths (``attn``, ``q_proj`` ...) are relative to one decoder layer; ``q_proj``,
    ``k_proj``... relative to the attention module. ``attn_out``/``mlp_out`` name the module
    whose output is what the block adds to the residual stream (Gemma's post-norms).
    """

    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    attn_out: str
    mlp_out: str
    o_proj: str
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None  # fused projection, NeoX per-head [q|k|v] layout
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_output: str = "bshd"  # layout of q_norm/k_norm outputs: "bshd" or "bhsd"
    ln_attn: str = "input_layernorm"
    ln_mlp: str = "post_attention_layernorm"
    # Module whose *input* is the residual stream between attention and MLP (None: parallel).
    resid_mid: str | None = "post_attention_layernorm"
    norm: str = "rmsnorm"
    parallel_residual: bool = False
    # Config flag that switches the family to a parallel residual (no resid_mid then).
    parallel_residual_flag: str | None = None
    rotary: str = "model.rotary_emb"


_LLAMA = FamilyLayout(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", mlp="mlp", attn_out="self_attn", mlp_out="mlp", o_proj="o_proj",
    q_proj="q_proj", k_proj="k_proj", v_proj="v_proj",
)
_QK_NORM = FamilyLayout(**{**asdict(_LLAMA), "q_norm": "q_norm", "k_norm": "k_norm"})
_GEMMA3 = FamilyLayout(**{
    **asdict(_QK_NORM), "qk_norm_output": "bhsd",
    "attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm",
    "ln_mlp": "pre_feedforward_layernorm", "resid_mid": "pre_feedforward_layernorm",
})
_GPT_NEOX = FamilyLayout(
    layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head", attn="attention", mlp="mlp", attn_out="attention", mlp_out="mlp",
    o_proj="dense", qkv_proj="query_key_value", norm="layernorm", rotary="gpt_neox.rotary_emb",
    parallel_residual_flag="use_parallel_residual",
)

FAMILIES: dict[str, FamilyLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QK_NORM,
    "gemma3_text": _GEMMA3,
    "gpt_neox": _GPT_NEOX,
    # -- dense families with their own twists
    # -- mixture-of-experts and attention sinks
    # -- other cache shapes: latent attention, multimodal RoPE, absolute positions, hybrids
}

#: Families whose layers the lean forward (notekv.lean) computes exactly as the model does;
#: every other family runs on the model's own modules (the hooked path). A family joins
#: only with a parity test of the lean forward against its HF forward.
LEAN_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_neox"})

# RoPE scaling types whose rotation is a pure function of the position delta. Dynamic NTK
# recomputes frequencies from the sequence length, so a shifted key is not a rotated key.
SHIFT_INVARIANT_ROPE = {"default", "linear", "llama3", "yarn", "longrope_fixed"}


@dataclass(frozen=True)
class RopeFacts:
    """RoPE of one layer, as the model applies it.

    ``inv_freq`` are the frequencies after scaling (radians per position, length
    ``rotary_dim // 2``); ``attention_factor`` is the factor folded into cos/sin (YaRN);
    ``pairing`` is ``"half"`` (NeoX/Llama: dim i pairs with i + rotary_dim/2) or
    ``"interleaved"`` (GPT-J: 2i pairs with 2i+1).
    """

    rope_type: str
    base: float
    rotary_dim: int
    head_dim: int
    pairing: str
    attention_factor: float
    inv_freq: tuple[float, ...]
    unsupported: str | None = None


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
            f"(notekv.model.arch.FAMILIES) does not match this model: {err}"
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
        inv = rotary.inv_freq
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
    return RopeFacts(
        rope_type=rope_type, base=float(params.get("rope_theta", 10000.0)), rotary_dim=rotary_dim,
        head_dim=head_dim, pairing="half", attention_factor=float(factor if factor is not None else 1.0),
        inv_freq=tuple(inv.tolist()), unsupported=unsupported,
    )


def config_hash(config) -> str:
    """Stable digest of the parts of a config that define the computation."""
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
              "_attn_implementation_autoset", "use_cache", "quantization_config"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
            f"{sorted(FAMILIES)}. Add a FamilyLayout to notekv.model.arch.FAMILIES naming its "
            "layers, attention/MLP modules, projections and norms."
        )
    layout = FAMILIES[model_type]
    if layout.parallel_residual_flag and getattr(config, layout.parallel_residual_flag, False):
        layout = replace(layout, resid_mid=None, parallel_residual=True)
    for path in (layout.layers, layout.embed, layout.final_norm, layout.unembed, layout.rotary):
        get_submodule(model, path)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_layers = config.num_hidden_layers
    layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    rope_by_type = {t: _rope_facts(model, layout, config, t, head_dim) for t in set(layer_types)}
    sliding = getattr(config, "sliding_window", None)
    if "sliding_attention" not in layer_types:
        sliding = None
    return ArchSpec(
        model_type=model_type, layout=layout, n_layers=n_layers, d_model=config.hidden_size,
        n_heads=n_heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, vocab_size=config.vocab_size,
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        layer_types=layer_types, sliding_window=sliding,
        rope=tuple(rope_by_type[t] for t in layer_types), config_hash=config_hash(config),
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None) or None,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) or None,
    )
