"""The capability matrix: every check on every family, measured, printed as yes / refused.

A cell is ``yes`` (notekv's result matched the reference; the measured error is kept),
``refused`` (the family refuses the operation with :class:`UnsupportedArchitectureError` or
:class:`UnsupportedError`; the reason is kept) or ``failed`` (a mismatch, or any other
exception: a defect). ``notekv families`` prints :func:`family_matrix`; ``notekv check``
prints :func:`check_model` for one model; the README shows the families' matrix.
"""

from __future__ import annotations

import random
import traceback
from dataclasses import asdict, dataclass, field

from ..hooks.sitemap import UnsupportedError
from ..model.arch import UnsupportedArchitectureError
from .checks import CHECKS, CheckFailed, Probe

REFUSALS = (UnsupportedArchitectureError, UnsupportedError)


@dataclass(frozen=True)
class Cell:
    """One capability on one model: ``status`` ``"yes"``, ``"refused"`` or ``"failed"``;
    ``error``: the measured relative error (yes); ``detail``: the refusal or failure."""

    status: str
    error: float | None = None
    detail: str = ""


@dataclass
class CapabilityRow:
    """The cells of one model (``label``: the family or model name)."""

    label: str
    model_type: str
    seed: int
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, Cell]:
        return {k: c for k, c in self.cells.items() if c.status == "failed"}

    def to_json(self) -> dict:
        return {"label": self.label, "model_type": self.model_type, "seed": self.seed,
                "cells": {k: asdict(c) for k, c in self.cells.items()}}


def run_check(name: str, probe: Probe) -> Cell:
    """Run one check; classify its outcome."""
    try:
        err = CHECKS[name](probe)
    except REFUSALS as refusal:
        return Cell("refused", detail=str(refusal).split("\n")[0])
    except CheckFailed as err:
        return Cell("failed", detail=str(err))
    except Exception as err:  # noqa: BLE001 - any other exception is a defect the matrix reports
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Cell("failed", detail=f"{type(err).__name__}: {err} ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})")
    return Cell("yes", error=float(err))


def check_model(model, *, label: str | None = None, checks=None, seed: int | None = None,
                progress: bool = False) -> CapabilityRow:
    """Every capability check (or those named in ``checks``) on ``model`` (a HookedModel).

    ``seed`` draws the prompts and the random offsets (default: a fresh random seed, kept
    in the row so a failure can be replayed)."""
    from ..runner import progress_bar

    seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    probe = Probe.of(model, seed)
    row = CapabilityRow(label or model.name, model.spec.model_type, seed)
    for name in progress_bar(list(checks or CHECKS), progress=progress, desc=row.label, leave=False):
        row.cells[name] = run_check(name, probe)
    return row


def family_matrix(archs=None, *, seed: int | None = None, progress: bool = False) -> list[CapabilityRow]:
    """:func:`check_model` on the tiny model of every family in
    :data:`~notekv.model.tiny.TINY_CONFIGS` (or of ``archs``)."""
    from ..model.tiny import TINY_CONFIGS
    from .. import tiny

    rows = []
    for arch in (archs or list(TINY_CONFIGS)):
        rows.append(check_model(tiny(arch), label=arch, seed=seed, progress=progress))
    return rows


def format_matrix(rows: list[CapabilityRow]) -> str:
    """The matrix as Markdown: one row per model, ``yes`` or a numbered refusal per cell
    (the reasons follow the table); a failed cell prints ``FAILED``."""
    names = list(CHECKS)
    lines = ["| family | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    notes: dict[str, int] = {}
    failures = []
    for row in rows:
        cells = []
        for n in names:
            c = row.cells.get(n)
            if c is None:
                cells.append("")
            elif c.status == "yes":
                cells.append("yes")
            elif c.status == "refused":
                i = notes.setdefault(c.detail, len(notes) + 1)
                cells.append(f"no [{i}]")
            else:
                cells.append("FAILED")
                failures.append(f"{row.label} {n}: {c.detail}")
        lines.append(f"| `{row.label}` | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {why.replace('|', '/')}" for why, i in notes.items()]
    if failures:
        lines.append("")
        lines += ["FAILED " + f for f in failures]
    return "\n".join(lines)
