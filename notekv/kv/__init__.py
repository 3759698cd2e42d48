"""KV floor: the KVCache object, per-layer RoPE, the fused rotation op, splicing and storage."""

from .atomic import OverwriteError, SaveError
from .cache import CacheMismatchError, KVCache, PositionError, write_slots
from .fused import HAVE_TRITON, rotate_keys, rotate_keys_reference
from .rope import RopeSpec, UnsupportedRopeError, layer_specs, rotate
from .splice import splice
from .store import CacheFileError, load_cache, save_cache

__all__ = [
    "CacheFileError", "CacheMismatchError", "HAVE_TRITON", "KVCache", "OverwriteError", "SaveError", "PositionError", "RopeSpec", "UnsupportedRopeError",
    "layer_specs", "load_cache", "rotate", "rotate_keys", "rotate_keys_reference", "save_cache", "splice", "write_slots",
]
