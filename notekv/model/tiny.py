"""Seeded random-init small models for tests, one per supported architecture shape.

Each comes with a byte-level tokenizer (one token per UTF-8 byte, fast, with offsets), so
text-addressed positions work exactly as on the real models.
"""

from __future__ import annotations

import torch

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
    # -- mixture-of-experts and attention sinks
    # -- other cache shapes: latent attention, multimodal RoPE, absolute positions, hybrids
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
    from transformers import AutoConfig, AutoModelForCausalLM

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
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = "sdpa"
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # HF init leaves norms at 1 and biases at 0; perturb them so every path is exercised.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "layernorm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.mul_(2.0)
    model.eval()
    model.requires_grad_(False)
    return model, byte_tokenizer()
