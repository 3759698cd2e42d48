"""The hook layer: sites and the site map, positions, interventions compiled to a plan, and
the native executor (HookLayer) that runs plans on a model."""

from .grad import DropSwitch, GradError, GradGate, Tap
from .interventions import Ablate, Collect, Hook, Intervention, Knockout, KVPatch, Patch, Steer
from .layer import HookLayer
from .model import Generation, HookedModel
from .plan import Cells, HookContext, Plan, PlanError, Step, compile_plan
from .positions import After, All, Delims, Last, PerRow, Pos, Range, Span, SpanError, TokenView, Where, resolve
from .run import CacheError, Run, copy_cache
from .serialize import load, save
from .sitemap import Route, SiteMap
from .sites import Site, SiteError, layer_sites, site

__all__ = [
    "Ablate", "After", "DropSwitch", "GradError", "GradGate", "Tap", "All", "CacheError", "Cells", "Collect", "Delims", "Generation", "Hook", "HookContext",
    "HookLayer", "HookedModel", "Intervention", "KVPatch", "Knockout", "Last", "Patch", "PerRow", "Plan", "PlanError",
    "Pos", "Range", "Route", "Run", "Site", "SiteError", "SiteMap", "Span", "SpanError", "Steer", "Step", "TokenView",
    "Where", "compile_plan", "copy_cache", "layer_sites", "load", "resolve", "save", "site",
]
