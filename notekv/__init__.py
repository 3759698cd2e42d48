"""notekv: interpretation and intervention on transformer KV caches.

>>> import notekv as nk
>>> model = nk.load("smollm2-135m")
>>> run = model.run("order_status: shipped", collect=["L3.resid_post"])
"""

from __future__ import annotations

import torch

from .hooks import (
    Ablate, After, All, CacheError, Collect, Delims, Generation, Hook, HookContext, HookedModel, HookLayer,
    Intervention, KVPatch, Knockout, Last, Patch, PerRow, Plan, PlanError, Pos, Range, Run, Site, SiteError,
    SiteMap, Span, SpanError, Steer, TokenView, Where, layer_sites, resolve, site,
)
from .hooks import load as load_interventions
from .hooks import save as save_interventions
from .kv import (
    CacheFileError, CacheMismatchError, KVCache, PositionError, RopeSpec, UnsupportedRopeError, rotate_keys, splice,
)
from .errors import ConcurrencyError, InputError, NotekvError
from .hooks.positions import SlotError
from .model import ArchSpec, UnsupportedArchitectureError, bundled_models
from .edit import EditableContext, EditError, EditState
from .compose import Composition, Skill, SkillStore, compose
from .lean import LeanEngine, LeanUnsupportedError
from .sweep import Sweep, patch_sweep

__version__ = "0.1.0"


def load(name_or_path: str, *, dtype: torch.dtype = torch.float32, canaries: bool = False) -> HookedModel:
    """Load a model offline: a bundled name (``"smollm2-135m"``, ``"gemma3-270m"``), a local HF
    directory or a ``.gguf`` file. ``canaries=True`` runs the cheap load checks."""
    from .model.load import load_hf

    hf, tok, name = load_hf(name_or_path, dtype=dtype)
    model = HookedModel(hf, tok, name)
    if canaries:
        from .hooks.canaries import run_canaries

        run_canaries(model)
    return model


def tiny(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> HookedModel:
    """A seeded random-init small model of family ``arch`` (see ``notekv.model.TINY_CONFIGS``)."""
    from .model.tiny import tiny_hf

    hf, tok = tiny_hf(arch, seed=seed, dtype=dtype, **overrides)
    return HookedModel(hf, tok, f"tiny-{arch}")


__all__ = [
    "Ablate", "After", "All", "ArchSpec", "CacheError", "CacheFileError", "CacheMismatchError", "KVCache",
    "PositionError", "RopeSpec", "UnsupportedRopeError", "rotate_keys", "splice", "Collect", "Delims", "Generation", "Hook",
    "HookContext", "HookLayer", "HookedModel", "Intervention", "KVPatch", "Knockout", "Last", "Patch", "PerRow",
    "Plan", "PlanError", "Pos", "Range", "Run", "Site", "SiteError", "SiteMap", "Span", "SpanError", "Steer",
    "TokenView", "resolve",
    "UnsupportedArchitectureError", "Where", "bundled_models", "layer_sites", "load", "load_interventions",
    "save_interventions", "site", "tiny",
    "EditableContext", "EditError", "EditState",
    "Composition", "Skill", "SkillStore", "compose",
    "LeanEngine", "LeanUnsupportedError",
    "Sweep", "patch_sweep",
    "ConcurrencyError", "InputError", "NotekvError", "SlotError",
]
