"""Execute the example notebooks headlessly and fail on any cell error.

Add a notebook to ``NOTEBOOKS`` to have it executed. Each one runs in a fresh kernel started
with this interpreter (``sys.executable``), from a copy in a temporary working directory, with
the checkout under test first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = [
    "02_locate_notes.ipynb",
    "01_quickstart.ipynb",
    "03_editing.ipynb",
    "04_composition.ipynb",
]
CELL_TIMEOUT_S = 600


def _kernel_manager(kernel_dir: Path):
    """A KernelManager whose only kernelspec launches ipykernel with ``sys.executable``
    (never a ``python3`` kernelspec that a user or another environment installed)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    name = "notekv-test"
    spec_dir = kernel_dir / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"notekv test ({sys.executable})",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=name, kernel_spec_manager=ksm), name


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name: str, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    source = NOTEBOOK_DIR / name
    assert source.is_file(), f"{source} is listed in NOTEBOOKS but does not exist"
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(source, work / name)
    nb = nbformat.read(work / name, as_version=4)

    km, kernel_name = _kernel_manager(tmp_path / "kernels")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")

    client = nbclient.NotebookClient(
        nb, km=km, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(work)}},
    )
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}: a cell raised\n{err}", pytrace=False)


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    """Notebooks are committed with outputs cleared (small diffs, no stale results)."""
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"
