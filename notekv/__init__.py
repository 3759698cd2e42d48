"""notekv: interpretation and intervention on transformer KV caches.

>>> import notekv as nk
>>> model = nk.load("smollm2-135m")
>>> run = model.run("order_status: shipped", collect=["L3.resid_post"])
"""

from __future__ import annotations

import torch

from .hooks import (
    Ablate, After, All, CacheError, GradError, Tap, Collect, Delims, Generation, Hook, HookContext, HookedModel, HookLayer,
    Intervention, KVPatch, Knockout, Last, Patch, PerRow, Plan, PlanError, Pos, Range, Run, Site, SiteError,
    SiteMap, SourceError, Span, SpanError, Steer, TokenView, UnsupportedError, Where, as_kvcache, layer_sites, resolve,
    site,
)
from .hooks import load as load_interventions
from .hooks import save as save_interventions
from .kv import (
    CacheFileError, CacheMismatchError, KVCache, OverwriteError, PositionError, RopeSpec, SaveError, UnsupportedRopeError,
    rotate_keys, splice,
)
from .errors import ConcurrencyError, InputError, NotekvError, check_device, check_dtype
from .hooks.positions import SlotError
from .hooks.moe import ExpertKnockout, ExpertKnockoutError
from .model import ArchSpec, UnsupportedArchitectureError, bundled_models
from .model.load import ModelFileError, ModelNotFoundError
from .model.arch import OutOfRangeError
from .edit import EditableContext, EditError, EditState
from .compose import Composition, Skill, SkillStore, compose
from .lean import LeanEngine, LeanUnsupportedError
from .sweep import HeadSweep, Result, Sweep, patch_sweep
from .attribution import attribute_acts, attribute_kv, kv_attribution
from .graph import CircuitGraph, circuit

__version__ = "0.1.0"


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def load(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
         device_map=None, attn_implementation: str | None = None, offload_folder: str | None = None,
         canaries: bool = False) -> HookedModel:
    """Load a model offline: a bundled name (``"smollm2-135m"``, ``"gemma3-270m"``), a local HF
    directory or a ``.gguf`` file.

    ``dtype``: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16``.
    ``device``: where the whole model goes (``"cuda"``, ``"cuda:1"``, ``"cpu"``); or
    ``device_map``: accelerate's placement (``"auto"``, ``{"": "cuda:0"}``, per-module with
    ``"cpu"`` / ``"disk"`` offload under ``offload_folder``); not both. ``attn_implementation``:
    transformers' attention kernel (``"sdpa"`` by default, ``"eager"``...). ``canaries=True``
    runs the cheap load checks.

    The bundled models are 4-bit GGUF checkpoints (SmolLM2-135M-Instruct Q4_1, Gemma-3-270M
    Q4_K_M) dequantized to fp32, not the original full-precision weights. What was read is
    ``model.provenance`` (file, quantization, the dtype it was dequantized to and loaded in),
    shown in ``repr(model)``.
    """
    from .model.load import load_hf

    dtype = check_dtype(dtype)
    if device is not None and device_map is not None:
        raise InputError("pass device= (the whole model on one device) or device_map= (accelerate's placement), not both")
    if attn_implementation is not None and attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(f"attn_implementation={attn_implementation!r}: choose one of {ATTENTION_IMPLEMENTATIONS}")
    target = check_device(device) if device is not None else None
    hf, tok, name = load_hf(name_or_path, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
                            offload_folder=offload_folder)
    if target is not None:
        hf.to(target)
    return wrap(hf, tok, name=name, canaries=canaries)


def wrap(hf_model: torch.nn.Module, tokenizer, *, name: str | None = None, canaries: bool = False) -> HookedModel:
    """A :class:`HookedModel` around a causal LM already in memory: any supported family, any
    dtype, on any device or dispatched by accelerate (``device_map``, CPU/disk offload). The
    model is switched to eval mode and its weights to ``requires_grad=False``; nothing else of
    it changes outside notekv's hook contexts."""
    if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
        raise InputError(f"wrap: hf_model must be a transformers causal LM (an nn.Module with a config), "
                         f"got {type(hf_model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise InputError(f"wrap: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    hf_model.eval()
    hf_model.requires_grad_(False)
    model = HookedModel(hf_model, tokenizer, name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__)
    if canaries:
        from .hooks.canaries import run_canaries

        run_canaries(model)
    return model


def tiny(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> HookedModel:
    """A seeded random-init small model of family ``arch`` (see ``notekv.model.TINY_CONFIGS``)."""
    from .model.tiny import tiny_hf

    from .model.load import Provenance

    hf, tok = tiny_hf(arch, seed=seed, dtype=dtype, **overrides)
    prov = Provenance(source=f"random init (tiny {arch}, seed {seed})", format="random",
                      dtype=str(dtype).removeprefix("torch."))
    return HookedModel(hf, tok, f"tiny-{arch}", provenance=prov)


__all__ = [
    "Ablate", "After", "All", "ArchSpec", "CacheError", "CacheFileError", "CacheMismatchError", "KVCache", "OverwriteError", "SaveError",
    "PositionError", "RopeSpec", "UnsupportedRopeError", "rotate_keys", "splice", "Collect", "Delims", "Generation", "Hook",
    "HookContext", "HookLayer", "HookedModel", "Intervention", "KVPatch", "Knockout", "Last", "Patch", "PerRow",
    "Plan", "PlanError", "Pos", "Range", "Run", "Site", "SiteError", "SiteMap", "SourceError", "Span", "SpanError", "Steer",
    "as_kvcache",
    "TokenView", "resolve",
    "UnsupportedArchitectureError", "Where", "bundled_models", "layer_sites", "load", "load_interventions",
    "save_interventions", "site", "tiny",
    "EditableContext", "EditError", "EditState",
    "Composition", "Skill", "SkillStore", "compose",
    "LeanEngine", "LeanUnsupportedError",
    "HeadSweep", "Result", "Sweep", "patch_sweep",
    "GradError", "Tap", "attribute_acts", "attribute_kv", "kv_attribution",
    "CircuitGraph", "circuit",
    "ConcurrencyError", "InputError", "ModelFileError", "ModelNotFoundError", "NotekvError", "OutOfRangeError",
    "SlotError", "UnsupportedError", "wrap",
    "ExpertKnockout", "ExpertKnockoutError",
]
