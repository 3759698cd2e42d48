"""The hook layer: sites and the site map, positions, interventions compiled to a plan, and
the native executor (HookLayer) that runs plans on a model."""

from .grad import DropSwitch, GradError, GradGate, Tap
from .interventions import Ablate, Collect, Hook, Intervention, Knockout, KVPatch, Patch, SourceError, Steer
from .layer import HookLayer
from .model import Generation, HookedModel
from .plan import Cells, HookContext, Plan, PlanError, Step, compile_plan
from .positions import After, All, Delims, Last, PerRow, Pos, Range, Span, SpanError, SpanMatch, TokenView, Where, resolve
from .run import CacheError, Run, as_kvcache, copy_cache
from .serialize import load, save
from .sitemap import Route, SiteMap, UnsupportedError, format_support_table, register_executor, support_table
from .sites import Site, SiteError, layer_sites, site

__all__ = [
    "Ablate", "After", "DropSwitch", "GradError", "GradGate", "Tap", "All", "CacheError", "Cells", "Collect", "Delims", "Generation", "Hook", "HookContext",
    "HookLayer", "HookedModel", "Intervention", "KVPatch", "Knockout", "Last", "Patch", "PerRow", "Plan", "PlanError",
    "Pos", "Range", "Route", "Run", "Site", "SiteError", "SiteMap", "SourceError", "Span", "SpanError", "SpanMatch", "Steer", "Step", "TokenView",
    "UnsupportedError", "Where", "as_kvcache", "format_support_table", "register_executor", "support_table", "compile_plan", "copy_cache", "layer_sites", "load", "resolve", "save", "site",
]
