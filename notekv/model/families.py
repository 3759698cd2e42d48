"""The family table: one :class:`FamilyLayout` row per HF ``model_type``.

A row names where a family's modules live (relative to the ``*ForCausalLM`` module) and the
flags that say how its computation differs (norms, residual wiring, RoPE pairing, fused or
latent projections, experts, sinks, positions, recurrent layers). :func:`notekv.model.arch.arch_spec`
combines the row with the numbers of one loaded model. Adding a family is one row here (plus
an adapter only where its cache has a new shape); ``notekv families`` measures what works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    qkv_proj: str | None = None  # fused q/k/v projection, laid out as qkv_split says
    # How the fused projection lays out q/k/v: "per_head" (GPT-NeoX: [H, 3D] per token) or
    # "flat" (Phi-3: [q (H_q*D) | k (H_kv*D) | v (H_kv*D)]).
    qkv_split: str = "per_head"
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_output: str = "bshd"  # layout of q_norm/k_norm outputs: "bshd" or "bhsd"
    # Config flag that switches the QK-norm on (None: the norms exist whenever named).
    qk_norm_flag: str | None = None
    ln_attn: str | None = "input_layernorm"  # None: no pre-norm (OLMo-2's post-norm blocks)
    ln_mlp: str | None = "post_attention_layernorm"
    # Module whose *input* is the residual stream between attention and MLP (None: parallel).
    resid_mid: str | None = "post_attention_layernorm"
    norm: str = "rmsnorm"
    parallel_residual: bool = False
    # Config flag that switches the family to a parallel residual (no resid_mid then).
    parallel_residual_flag: str | None = None
    rotary: str | None = "model.rotary_emb"  # None where ``positions`` is not "rotary"
    rope_pairing: str = "half"  # "half" (Llama/NeoX) or "interleaved" (Cohere, GPT-J)
    # The attention forward hands apply_rotary_pos_emb only the rotary dims of a partial
    # rotary (StableLM, Phi), so that call's output is not the whole query / key.
    rope_call_partial: bool = False
    # Layers without RoPE (NoPE; rotary_dim 0): every layer of this type (Cohere-2's global
    # layers), or those whose entry in this per-layer config list is 0 (SmolLM3's no_rope_layers).
    nope_layer_type: str | None = None
    rope_layers_flag: str | None = None
    # Module whose output object's ``logits`` field is the model's logits, for heads that
    # scale or cap the unembed's output (Gemma-2 soft-cap, Cohere logit_scale, Granite
    # logits_scaling); "" is the CausalLM itself. None: the unembed's output is the logits.
    logits_out: str | None = None
    # Config field the model multiplies the embedding module's output by before layer 0
    # (Granite's embedding_multiplier); notekv's ``embed`` is the module's output, before it.
    embed_multiplier: str | None = None
    # Config field the block multiplies attn_out / mlp_out by before adding them to the
    # residual (Granite's residual_multiplier); notekv's sites are the modules' outputs, before it.
    residual_multiplier: str | None = None
    # Mixture-of-experts block, paths relative to one decoder layer (None: a dense MLP). The
    # router returns (logits [T, E], weights [T, k], indices [T, k]); the fused experts
    # module computes experts(x [T, d], indices, weights) -> [T, d]. ``routing`` names how
    # weights and indices follow from the logits (notekv.hooks.moe.ROUTINGS).
    router: str | None = None
    experts: str | None = None
    routing: str = "softmax_topk"
    # Learned per-head sink logits join the softmax (GPT-OSS: the attention module's ``sinks``).
    attn_sinks: bool = False
    # How token positions enter the model: "rotary" (RoPE on q/k; ``rotary`` names the module),
    # "learned" (a learned absolute embedding added to the token embeddings: GPT-2) or "none"
    # (no positional encoding: Jamba's attention, whose order comes from its Mamba layers).
    positions: str = "rotary"
    # Mixer module of a state-space (Mamba) layer, relative to the decoder layer: a hybrid's
    # layers whose config layer type is in RECURRENT_LAYER_TYPES have it in place of ``attn``
    # (Jamba). Their cache is a recurrent state, not per-token K/V. None: attention only.
    recurrent: str | None = None
    # Head sizes read off the config (latent attention). ``qk_head_dims``: fields whose sum is
    # the query/key head size (empty: ``head_dim``); ``v_head_dim_field``: the value head size
    # (None: the key's); ``rotary_offset_field``: key dims before the rotary part (MLA's
    # un-rotated ``qk_nope_head_dim``; None: RoPE starts at dim 0).
    qk_head_dims: tuple[str, ...] = ()
    v_head_dim_field: str | None = None
    rotary_offset_field: str | None = None
    # Method of the attention module that expands the cached latent into per-head K/V (MLA's
    # ``expand_kv``): notekv caches the expanded K/V instead (notekv.hooks.latent).
    kv_expand: str | None = None
    # (config field, layout field, path): where the config field is None, the layout field
    # names that path (MLA without a query LoRA projects with q_proj, not q_b_proj).
    config_paths: tuple[tuple[str, str, str], ...] = ()
    # Sub-config that holds the language model's numbers (Qwen2.5-VL: "text_config").
    text_config: str | None = None
    # The model keeps position state between calls (Qwen2.5-VL's rope_deltas): notekv passes
    # the RoPE positions it means on every forward instead of letting the model infer them.
    explicit_positions: bool = False
    # The transformers auto class that builds the family's language model with its head
    # (Qwen2.5-VL has no causal-LM mapping: the image-text class, whose text path notekv uses).
    auto_class: str = "AutoModelForCausalLM"


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
_MIXTRAL = FamilyLayout(**{**asdict(_LLAMA), "router": "mlp.gate", "experts": "mlp.experts",
                            "routing": "softmax_topk_fp32"})
_QWEN_MOE = FamilyLayout(**{**asdict(_LLAMA), "router": "mlp.gate", "experts": "mlp.experts"})

_MLA_V2 = FamilyLayout(**{**asdict(_LLAMA), "q_proj": "q_b_proj", "k_proj": None, "v_proj": None,
                          "rope_pairing": "interleaved", "qk_head_dims": ("qk_nope_head_dim", "qk_rope_head_dim"),
                          "v_head_dim_field": "v_head_dim", "rotary_offset_field": "qk_nope_head_dim",
                          "kv_expand": "expand_kv", "config_paths": (("q_lora_rank", "q_proj", "q_proj"),),
                          "router": "mlp.gate", "experts": "mlp.experts", "routing": "deepseek_v2"})

FAMILIES: dict[str, FamilyLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QK_NORM,
    "gemma3_text": _GEMMA3,
    "gpt_neox": _GPT_NEOX,
    # -- dense families with their own twists
    # Gemma-3's sandwich norms without QK-norm; attention and final-logit soft-capping.
    "gemma2": FamilyLayout(**{**asdict(_GEMMA3), "q_norm": None, "k_norm": None, "qk_norm_output": "bshd",
                              "logits_out": ""}),
    # One fused qkv_proj laid out flat [q | k | v]; LongRoPE.
    "phi3": FamilyLayout(**{**asdict(_LLAMA), "q_proj": None, "k_proj": None, "v_proj": None,
                            "qkv_proj": "qkv_proj", "qkv_split": "flat"}),
    # No pre-norms: post-norms on the attention and MLP outputs; QK-norm over the whole projection.
    "olmo2": FamilyLayout(**{**asdict(_QK_NORM), "ln_attn": None, "ln_mlp": None,
                             "attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm",
                             "resid_mid": "mlp"}),
    # Parallel block on one LayerNorm, interleaved RoPE pairs, logit_scale, optional QK-norm.
    "cohere": FamilyLayout(**{**asdict(_QK_NORM), "ln_mlp": None, "resid_mid": None, "parallel_residual": True,
                              "norm": "layernorm", "rope_pairing": "interleaved", "qk_norm_flag": "use_qk_norm",
                              "logits_out": ""}),
    # Cohere's block; sliding layers with RoPE, global layers without (NoPE).
    "cohere2": FamilyLayout(**{**asdict(_LLAMA), "ln_mlp": None, "resid_mid": None, "parallel_residual": True,
                               "norm": "layernorm", "rope_pairing": "interleaved", "logits_out": "",
                               "nope_layer_type": "full_attention"}),
    # Llama's modules; embedding, residual, attention and logit multipliers (logits_out: the scaled logits).
    "granite": FamilyLayout(**{**asdict(_LLAMA), "logits_out": "", "embed_multiplier": "embedding_multiplier",
                               "residual_multiplier": "residual_multiplier"}),
    # Llama's modules; NoPE layers where config.no_rope_layers is 0.
    "smollm3": FamilyLayout(**{**asdict(_LLAMA), "rope_layers_flag": "no_rope_layers"}),
    # LayerNorm, partial rotary, optional per-head QK LayerNorm and parallel residual.
    "stablelm": FamilyLayout(**{**asdict(_LLAMA), "norm": "layernorm", "q_norm": "q_layernorm",
                                "k_norm": "k_layernorm", "qk_norm_output": "bhsd", "qk_norm_flag": "qk_layernorm",
                                "parallel_residual_flag": "use_parallel_residual", "rope_call_partial": True}),
    # Parallel block on one LayerNorm, dense as o_proj, partial rotary, biases, optional QK LayerNorm.
    "phi": FamilyLayout(**{**asdict(_LLAMA), "final_norm": "model.final_layernorm", "o_proj": "dense",
                           "ln_mlp": None, "resid_mid": None, "parallel_residual": True, "norm": "layernorm",
                           "q_norm": "q_layernorm", "k_norm": "k_layernorm", "qk_norm_output": "bhsd",
                           "qk_norm_flag": "qk_layernorm", "rope_call_partial": True}),
    # LayerNorm with bias, c_fc/c_proj MLP, a sliding window on every layer.
    "starcoder2": FamilyLayout(**{**asdict(_LLAMA), "norm": "layernorm"}),
    # -- mixture-of-experts and attention sinks
    # Routed experts behind mlp.gate (softmax, top-k, renormalized in fp32).
    "mixtral": _MIXTRAL,
    # The same routing with an optional renormalization; Qwen2-MoE adds a gated shared expert
    # inside the block (mlp_out holds it, moe.experts does not).
    "qwen2_moe": _QWEN_MOE,
    "qwen3_moe": FamilyLayout(**{**asdict(_QWEN_MOE), "q_norm": "q_norm", "k_norm": "k_norm"}),
    # QK-norm over the whole projection ([B, S, H * D]).
    "olmoe": FamilyLayout(**{**asdict(_QWEN_MOE), "q_norm": "q_norm", "k_norm": "k_norm"}),
    # Attention sinks, alternating sliding/global layers, a biased router (top-k, then softmax).
    "gpt_oss": FamilyLayout(**{**asdict(_LLAMA), "router": "mlp.router", "experts": "mlp.experts",
                               "routing": "topk_softmax", "attn_sinks": True}),
    # -- other cache shapes: latent attention, multimodal RoPE, absolute positions, hybrids
    # Multi-head latent attention. The model caches a latent; notekv caches the per-head K/V
    # expanded from it (kv_expand): K of qk_nope + qk_rope dims, the rotary part last and
    # shared by all heads, V of v_head_dim. No per-head pre-RoPE key exists (attn.k_pre).
    # V2 rotates by complex multiplication (interleaved pairs); V3 rotates interleaved or
    # half-split weights but always writes the result half-split, so its cached keys pair "half".
    "deepseek_v2": _MLA_V2,
    "deepseek_v3": FamilyLayout(**{**asdict(_MLA_V2), "rope_pairing": "half", "routing": "deepseek_v3"}),
    # Multimodal RoPE, text path: the language model sits inside the image-text wrapper; positions
    # are [3, B, S] (temporal, height, width), equal on text, so moving a key by d is the usual
    # rotation. The wrapper remembers rope_deltas between calls: notekv always passes positions.
    "qwen2_5_vl": FamilyLayout(**{**asdict(_LLAMA), "layers": "model.language_model.layers",
                                  "embed": "model.language_model.embed_tokens",
                                  "final_norm": "model.language_model.norm",
                                  "rotary": "model.language_model.rotary_emb", "text_config": "text_config",
                                  "explicit_positions": True, "auto_class": "AutoModelForImageTextToText"}),
    # Learned absolute positions, Conv1D projections with one flat [q | k | v] c_attn, LayerNorm.
    "gpt2": FamilyLayout(
        layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head",
        attn="attn", mlp="mlp", attn_out="attn", mlp_out="mlp", o_proj="c_proj", qkv_proj="c_attn",
        qkv_split="flat", ln_attn="ln_1", ln_mlp="ln_2", resid_mid="ln_2", norm="layernorm", rotary=None,
        positions="learned"),
    # Mamba layers interleaved with attention layers (no positional encoding); MoE feed-forwards.
    "jamba": FamilyLayout(**{**asdict(_LLAMA), "final_norm": "model.final_layernorm", "mlp": "feed_forward",
                             "mlp_out": "feed_forward", "ln_mlp": "pre_ff_layernorm",
                             "resid_mid": "pre_ff_layernorm", "rotary": None, "positions": "none",
                             "recurrent": "mamba", "router": "feed_forward.router",
                             "experts": "feed_forward.experts"}),
}

#: Families whose layers the lean forward (notekv.lean) computes exactly as the model does;
#: every other family runs on the model's own modules (the hooked path). A family joins
#: only with a parity test of the lean forward against its HF forward.
LEAN_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_neox"})

#: Config layer types of a hybrid's state-space layers (no attention, no K/V; see
#: ``FamilyLayout.recurrent``).
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "mamba"})
