"""The hook layer: sites, positions, interventions, and the HookLayer that applies them."""

from .interventions import Ablate, Collect, Hook, Intervention, Knockout, KVPatch, Patch, Steer, load, save
from .apply import HookContext
from .layer import HookLayer
from .model import Generation, HookedModel
from .positions import After, All, Delims, Last, Pos, Range, Span, SpanError, TokenView, Where
from .run import CacheError, Run, copy_cache
from .sites import Site, SiteError, layer_sites, site

__all__ = [
    "Ablate", "After", "All", "CacheError", "Collect", "Delims", "Generation", "Hook", "HookContext",
    "HookLayer", "HookedModel", "Intervention", "KVPatch", "Knockout", "Last", "Patch", "Pos", "Range",
    "Run", "Site", "SiteError", "Span", "SpanError", "Steer", "TokenView", "Where", "copy_cache",
    "layer_sites", "load", "save", "site",
]
