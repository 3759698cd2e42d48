"""Seeded random-init small models for tests, one per supported architecture shape.

Each comes with a byte-level tokenizer (one token per UTF-8 byte, fast, with offsets), so
text-addressed positions work exactly as on the real models.
"""

from __future__ import annotations

import torch

from .families import FAMILIES

TINY_CONFIGS: dict[str, dict] = {
    # GQA 4q/2kv, default RoPE.
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama-3 frequency scaling: per-frequency linear ramp.
    "llama3": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 1024}),
    # Mistral: sliding window in the config, global in practice when None.
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # QK-norm, YaRN scaling (attention factor folded into cos/sin).
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                                   "original_max_position_embeddings": 1024}),
    # Sliding (window 8) and global layers with two RoPE bases, QK-norm, sandwich norms.
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                        sliding_window=8,
                        layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                     "full_attention"],
                        query_pre_attn_scalar=32,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
    # Partial rotary (rotary_dim 4 of head_dim 16), parallel residual, fused QKV.
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, head_dim=16, use_parallel_residual=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.25}),
    # -- dense families with their own twists
    # Sliding (window 8) / global layers, attention and final-logit soft-caps (HF: eager only).
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   query_pre_attn_scalar=24, attn_logit_softcapping=0.3, final_logit_softcapping=1.0,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager"),
    # Flat fused qkv_proj, fused gate_up_proj, LongRoPE (short factors below position 2048).
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, original_max_position_embeddings=2048,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 2048,
                                  "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                  "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}),
    # Post-norms only, QK-norm over the whole projection.
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Parallel block, interleaved RoPE, per-head QK LayerNorm, logit_scale.
    "cohere": dict(model_type="cohere", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True, logit_scale=0.5,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Sliding layers (window 8) with interleaved RoPE, a global NoPE layer, logit_scale.
    "cohere2": dict(model_type="cohere2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=8, logit_scale=0.5,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Embedding, residual, attention and logit multipliers.
    "granite": dict(model_type="granite", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=3.0,
                    residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Every second layer without RoPE (NoPE).
    "smollm3": dict(model_type="smollm3", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, no_rope_layer_interval=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # LayerNorm, partial rotary (a quarter of head_dim), per-head QK LayerNorm.
    "stablelm": dict(model_type="stablelm", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.25}),
    # Parallel block, dense o_proj, partial rotary (half of head_dim), biases, QK LayerNorm.
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # LayerNorm with bias, c_fc/c_proj MLP, biases, a sliding window (8) on every layer.
    "starcoder2": dict(model_type="starcoder2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=8, use_bias=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # -- mixture-of-experts and attention sinks
    # 4 experts, top-2, renormalized routing weights.
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Routed experts plus a sigmoid-gated shared expert; layer 1 is a dense MLP (mlp_only_layers).
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                      mlp_only_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Per-head QK-norm, renormalized top-2 of 4.
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, sliding_window=None,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # QK-norm over the whole projection, softmax weights not renormalized.
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # Attention sinks, sliding (window 8) / global layers, biased router, clamped SwiGLU experts,
    # YaRN; HF refuses SDPA for it: eager attention.
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 256}),
    # -- other cache shapes: latent attention, multimodal RoPE, absolute positions, hybrids
    # Learned absolute positions, one flat Conv1D c_attn. GPT2Config's own names (n_embd,
    # n_layer, n_head, n_positions) are aliases of these in its attribute_map, so tiny_hf's
    # vocabulary, position and special-token defaults land on the right fields.
    "gpt2": dict(model_type="gpt2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, n_inner=128),
    # Hybrid: Mamba layers 0 and 2 (with 4-expert top-2 MoE feed-forwards), attention layers 1
    # and 3 (GQA 4q/2kv, no positional encoding, dense MLPs). The Mamba layers run the PyTorch
    # scan (no mamba-ssm kernels needed).
    "jamba": dict(model_type="jamba", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                  num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=0,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    # Multi-head latent attention: K/V decompressed from a shared latent, keys of 8 un-rotated
    # + 8 rotary dims (interleaved pairs, rotated by complex multiplication), values of 12;
    # query LoRA; layer 0 dense, layers 1-2 routed (4 experts, top-2) plus a shared expert.
    "deepseek_v2": dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, head_dim=8,
                        q_lora_rank=24, kv_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # The same with DeepSeek-V3's sigmoid, group-limited routing (2 groups of 2) and interleaved
    # rotary weights (rope_interleave: HF rotates pairs 2i, 2i+1 and writes them half-split).
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, head_dim=8,
                        q_lora_rank=24, kv_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        rope_interleave=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Multimodal RoPE (text path): 3-D positions, mrope_section [2, 3, 3] of the 8 frequencies;
    # a one-block vision tower (built from the config, never run on text). Not a CausalLM
    # class in transformers: built with AutoModelForImageTextToText.
    "qwen2_5_vl": dict(model_type="qwen2_5_vl",
                       text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256 + 3,
                                        max_position_embeddings=8192, bos_token_id=256, eos_token_id=257,
                                        pad_token_id=258, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [2, 3, 3]}),
                       vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                          out_hidden_size=64, fullatt_block_indexes=[0])),
}

TINY_VOCAB = 256 + 3  # bytes + <bos>, <eos>, <pad>
TINY_MAX_POSITIONS = 8192


def byte_tokenizer():
    """A fast tokenizer with one token per byte (GPT-2 byte alphabet), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def tiny_hf(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """``(model, tokenizer)`` for a seeded random tiny model of family ``arch``.

    ``overrides`` replace config fields (e.g. ``num_hidden_layers=4``,
    ``rope_parameters={...}``). Same ``arch``, ``seed`` and overrides give identical weights.
    """
    import transformers
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        from ..errors import InputError

        raise InputError(f"arch={arch!r}: unknown tiny architecture; choose one of {sorted(TINY_CONFIGS)}")
    fields = {**TINY_CONFIGS[arch], **overrides}
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", TINY_VOCAB)
    fields.setdefault("max_position_embeddings", TINY_MAX_POSITIONS)
    fields.setdefault("bos_token_id", TINY_VOCAB - 3)
    fields.setdefault("eos_token_id", TINY_VOCAB - 2)
    fields.setdefault("pad_token_id", TINY_VOCAB - 1)
    fields.setdefault("tie_word_embeddings", False)
    attn_implementation = fields.pop("attn_implementation", "sdpa")  # "eager" where HF refuses SDPA
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = attn_implementation
    auto_class = FAMILIES[model_type].auto_class if model_type in FAMILIES else "AutoModelForCausalLM"
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = getattr(transformers, auto_class).from_config(config, dtype=dtype)
        # HF init leaves norms at 1 and biases at 0; perturb them so every path is exercised.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "layernorm" in name or ".ln_" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.mul_(2.0)
    model.eval()
    model.requires_grad_(False)
    return model, byte_tokenizer()
