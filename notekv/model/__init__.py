"""Model floor: offline loading, tiny test models, per-architecture facts."""

from .arch import FAMILIES, ArchSpec, FamilyLayout, RopeFacts, UnsupportedArchitectureError, arch_spec
from .load import BUNDLED, ModelNotFoundError, Provenance, bundled_models, cache_dir, load_hf
from .tiny import TINY_CONFIGS, tiny_hf

__all__ = [
    "ArchSpec", "BUNDLED", "FAMILIES", "FamilyLayout", "ModelNotFoundError", "Provenance", "RopeFacts", "TINY_CONFIGS",
    "UnsupportedArchitectureError", "arch_spec", "bundled_models", "cache_dir", "load_hf", "tiny_hf",
]
