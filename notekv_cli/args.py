"""Argument types of the ``notekv`` command line: every value is checked when the command
line is parsed, before any model is loaded, and a bad one is a one-line error (exit 2)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def count(low: int = 1):
    """An argparse type: a whole number of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value
    parse.__name__ = f"count>={low}"
    return parse


def number(text: str) -> float:
    """An argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def out_dir(text: str) -> Path:
    """An argparse type: a directory notekv can create or write into (as far as a look can
    tell; :func:`prepare_out` then tries it before any work)."""
    try:
        path = Path(text).expanduser()
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
        parent = path
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{path} cannot be created: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK):
            raise argparse.ArgumentTypeError(f"{path} cannot be created: {parent} is not writable")
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop...
        shown = repr(text[:60]) + ("..." if len(text) > 60 else "")
        raise argparse.ArgumentTypeError(f"{shown} is not a usable path ({getattr(err, 'strerror', None) or err})") \
            from None
    return path


def prepare_out(path: Path, files: tuple[str, ...]) -> Path:
    """Create the output directory ``path`` and check, by writing a probe file there, that
    ``files`` can be written into it: a path the parse-time look accepts but the system refuses
    (a read-only or special file system, an output name taken by a directory) is a one-line
    error before the model loads, not a traceback after the work."""
    import tempfile

    from notekv.errors import InputError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {path}: cannot create the directory ({err.strerror or err}); pass a directory you "
                         "can write") from None
    taken = [name for name in files if (path / name).is_dir()]
    if taken:
        raise InputError(f"--out {path}: {path / taken[0]} is a directory where the command writes a file; remove it "
                         "or pass another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".notekv-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"--out {path}: cannot write there ({err.strerror or err}); pass a directory you can "
                         "write") from None
    return path


REPORT_MARK = "made_by"  # report.json's field that marks a directory notekv's report wrote


def default_out(model: str, scenario: str, root: str = "reports") -> Path:
    """``reports/<model>-<scenario>``: a bundled name, or a file's or directory's name, for
    each (``reports/smollm2-135m-refund``, ``reports/gemma3-270m-my_gate``)."""
    import re

    def slug(text: str) -> str:
        p = Path(text)
        name = p.stem if p.suffix in (".gguf", ".toml") else p.name or str(text)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return Path(root) / f"{slug(model)}-{slug(scenario)}"


def made_by_notekv(path: Path) -> bool:
    """Whether ``path/report.json`` is a notekv report (complete or partial): a JSON object with
    notekv's fields (``made_by``, or ``notekv_version`` and ``citation`` as earlier versions wrote)."""
    import json

    try:
        d = json.loads((path / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and (d.get(REPORT_MARK) == "notekv report"
                                    or {"notekv_version", "citation", "model", "scenario"} <= set(d))


def claim_out(path: Path, files: tuple[str, ...], force: bool = False) -> Path:
    """:func:`prepare_out`, and refuse a directory that holds anything but a notekv report
    (whose files are then replaced) unless ``force``: a one-line error before the model loads."""
    from notekv.errors import InputError

    if path.is_dir() and not force:
        taken = [name for name in files if (path / name).is_dir()]
        if not taken and any(path.iterdir()) and not made_by_notekv(path):
            shown = sorted(p.name for p in path.iterdir())
            listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
            raise InputError(f"--out {path}: the directory is not empty ({listed}) and holds no notekv report; pass "
                             "an empty or new directory, or --force to write report.json and index.html into it")
    return prepare_out(path, files)


def model_name(text: str) -> str:
    """An argparse type: a bundled model name, a .gguf file or an HF directory."""
    from notekv.model.load import ModelNotFoundError, check_model_name

    try:
        return check_model_name(text)
    except ModelNotFoundError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def scenario(text: str) -> str:
    """An argparse type: a built-in scenario or a scenario .toml that loads."""
    from circuits import scenarios

    try:
        scenarios.get(text)
    except scenarios.ScenarioError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def dtype_name(text: str) -> str:
    """An argparse type: a weight dtype name (``float32``, ``bfloat16``, ``float16`` or fp32/bf16/fp16)."""
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; choose float32, bfloat16 or float16 "
                                         "(or fp32, bf16, fp16)") from None


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N`` (checked on this machine) or ``auto``
    (accelerate places the model over the devices it finds)."""
    if text == "auto":
        return text
    from notekv.errors import InputError, check_device

    try:
        check_device(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err).replace("device=", "", 1)) from None
    return text


def add_model(parser, default: str = "smollm2-135m") -> None:
    """The ``--model``, ``--dtype`` and ``--device`` options every command shares."""
    parser.add_argument("--model", default=default, type=model_name,
                        help=f"bundled name, HF directory or .gguf path (default {default})")
    parser.add_argument("--dtype", default="float32", type=dtype_name,
                        help="the weights' dtype: float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", type=device_name,
                        help="where the model runs: cpu (default), cuda, cuda:N, or auto (accelerate's device_map)")


def load_model(args, *, dtype=None):
    """The model the command line names: ``args.model`` in ``args.dtype`` (or the torch dtype
    ``dtype``) on ``args.device``."""
    import torch

    import notekv as nk

    dt = dtype if dtype is not None else getattr(torch, args.dtype)
    if args.device == "auto":
        return nk.load(args.model, dtype=dt, device_map="auto")
    return nk.load(args.model, dtype=dt, device=args.device)


def add_model_and_out(parser) -> None:
    """``--model`` and a required ``--out`` directory (the evaluation commands)."""
    add_model(parser)
    parser.add_argument("--out", required=True, type=out_dir, help="output directory")
