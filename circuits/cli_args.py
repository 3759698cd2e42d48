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
    """An argparse type: a directory notekv can create or write into."""
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
    return path


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


def add_model(parser, default: str = "smollm2-135m") -> None:
    """The ``--model`` option every command shares."""
    parser.add_argument("--model", default=default, type=model_name,
                        help=f"bundled name, HF directory or .gguf path (default {default})")


def add_model_and_out(parser) -> None:
    """``--model`` and a required ``--out`` directory (the evaluation commands)."""
    add_model(parser)
    parser.add_argument("--out", required=True, type=out_dir, help="output directory")
