"""Execute the example notebooks headlessly and fail on any cell error; check the stored ones.

Add a notebook to ``NOTEBOOKS`` to have it executed. Each one runs in a fresh kernel started
with this interpreter (``sys.executable``), from a copy in a temporary working directory, with
the checkout under test first on ``PYTHONPATH``. The notebooks are committed with the outputs of
``scripts/run_notebooks.py`` (executed in place, each plotly figure with a static image beside
its JSON so a code host shows it); executing them here needs no kaleido.
"""

from __future__ import annotations

import importlib.util
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
    "05_circuit_graph.ipynb",
]
CELL_TIMEOUT_S = 600


def _runner():
    """``scripts/run_notebooks.py`` as a module (its output checks)."""
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    finally:  # a client given its kernel manager leaves the kernel running (and its model loaded)
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    bad = _runner().problems(nb, images=False)  # the notebook itself keeps progress bars out of its outputs
    assert not bad, f"{name}: " + "; ".join(bad)


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_stored_with_outputs_that_render_without_javascript(path: Path) -> None:
    """Notebooks are committed executed (scripts/run_notebooks.py): every code cell run once, top
    to bottom; every plotly figure with a static image/png or image/svg+xml beside its JSON; no
    error and no progress-bar text in any output."""
    nb = json.loads(path.read_text())
    bad = _runner().problems(nb, images=True)
    assert not bad, f"{path.name}: " + "; ".join(bad) + "; rerun scripts/run_notebooks.py " + path.name
    figures = [o for c in nb["cells"] for o in c.get("outputs", []) if _runner().PLOTLY in o.get("data", {})]
    assert figures, f"{path.name}: no plotly figure among the outputs"


def test_output_checks_catch_what_a_code_host_would_show_badly() -> None:
    runner = _runner()
    fig = {"output_type": "display_data", "metadata": {}, "data": {runner.PLOTLY: {"data": [], "layout": {}}}}
    bar = {"output_type": "stream", "name": "stderr", "text": "Loading: 40%|####      | 4/10 [00:01<00:02, 3.1it/s]"}

    def nb(*outputs, counts=(1,)):
        return {"cells": [{"cell_type": "code", "execution_count": c, "source": "", "outputs": list(outputs)}
                          for c in counts]}

    assert runner.problems(nb({"output_type": "stream", "name": "stdout", "text": "ok\n"})) == []
    assert "static image" in runner.problems(nb(fig))[0]
    assert runner.problems(nb(fig), images=False) == []
    with_png = json.loads(json.dumps(fig))
    with_png["data"]["image/png"] = "iVBORw0KGgo="
    assert runner.problems(nb(with_png)) == []
    assert "progress-bar" in runner.problems(nb(bar))[0]
    assert "top to bottom" in runner.problems(nb(with_png, counts=(1, None)))[0]


def test_no_images_never_overwrites_a_stored_notebook(tmp_path: Path) -> None:
    """``--no-images`` executes and leaves the stored file alone (it would lose its static
    images); with ``--out`` the executed notebook is written there."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    runner = _runner()
    assert runner.main(["--no-images", str(path)]) == 0
    assert path.read_bytes() == before
    out = tmp_path / "out"
    assert runner.main(["--no-images", "--out", str(out), str(path)]) == 0
    written = nbformat.read(out / "tiny.ipynb", as_version=4)
    assert written.cells[0].outputs[0]["text"].strip() == "42" and path.read_bytes() == before
