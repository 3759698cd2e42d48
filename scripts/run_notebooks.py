"""Execute the example notebooks in place and store them with their outputs.

    .venv/bin/python scripts/run_notebooks.py                 # every notebooks/*.ipynb
    .venv/bin/python scripts/run_notebooks.py notebooks/04_composition.ipynb
    .venv/bin/python scripts/run_notebooks.py --check         # only check the stored notebooks

Each notebook runs top to bottom in a fresh kernel started with this interpreter, from a
temporary working directory, with the checkout first on ``PYTHONPATH`` and the hub offline
(the notebooks load the bundled models). Every plotly figure output then also gets a static
``image/png`` rendering beside plotly's JSON, which code hosts that do not run JavaScript show
instead; that needs ``kaleido`` (the ``notebooks`` extra) and a Chrome or Chromium
(``apt-get install chromium``; ``--chrome PATH`` points kaleido at one). ``--no-images`` skips
them, and then only executes the notebooks (or writes them to ``--out DIR``): a stored notebook
is never overwritten without its static images. A notebook is written only when it ran without
an error and its outputs pass :func:`problems` (no progress-bar text, a static image for every
figure).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
STATIC = ("image/png", "image/svg+xml")
PROGRESS = re.compile(r"\d+%\|| \d+/\d+ \[|it/s\]|s/it\]|\r|IProgress|Loading weights")
CELL_TIMEOUT_S = 600
DEFAULT_WIDTH, DEFAULT_HEIGHT = 900, 500


def kernel_manager(kernel_dir: Path):
    """A KernelManager whose only kernelspec launches ipykernel with ``sys.executable`` (never
    a ``python3`` kernelspec another environment installed)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    name = "notekv-notebooks"
    spec_dir = kernel_dir / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"notekv ({sys.executable})",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=name, kernel_spec_manager=ksm), name


def kernel_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def execute(nb, work: Path, timeout: int = CELL_TIMEOUT_S):
    """Run ``nb`` (an nbformat notebook, changed in place) in a fresh kernel from ``work``.
    Raises ``nbclient.exceptions.CellExecutionError`` on the first cell that fails."""
    import nbclient

    km, name = kernel_manager(work / "kernels")
    kernelspec = nb.metadata.get("kernelspec")
    client = nbclient.NotebookClient(nb, km=km, kernel_name=name, timeout=timeout, allow_errors=False,
                                     record_timing=False, resources={"metadata": {"path": str(work)}})
    try:
        client.execute(env=kernel_env())
    finally:  # a client given its kernel manager leaves the kernel running
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    if kernelspec is not None:  # keep the portable kernelspec, not the one this run used
        nb.metadata["kernelspec"] = kernelspec
    return nb


def _size(fig, axis: str, default: int) -> int:
    value = getattr(fig.layout, axis)
    return int(value) if value else default


def add_static_images(nb) -> int:
    """Give every plotly output an ``image/png`` rendering of the same figure; returns how many.
    Needs kaleido and a Chrome/Chromium."""
    try:
        import kaleido
    except ImportError:
        raise SystemExit("static images need kaleido (pip install 'notekv[notebooks]') and a Chrome or Chromium "
                         "(apt-get install chromium); or pass --no-images") from None
    import plotly.io as pio

    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kaleido.start_sync_server(silence_warnings=True)
        try:
            for cell in nb.cells:
                for out in cell.get("outputs", []):
                    data = out.get("data", {})
                    if PLOTLY not in data:
                        continue
                    fig = pio.from_json(json.dumps(data[PLOTLY]), skip_invalid=True)
                    png = pio.to_image(fig, format="png", width=_size(fig, "width", DEFAULT_WIDTH),
                                       height=_size(fig, "height", DEFAULT_HEIGHT))
                    data["image/png"] = base64.b64encode(png).decode("ascii")
                    data.setdefault("text/plain", f"<plotly figure: {fig.layout.title.text or 'untitled'}>")
                    n += 1
        finally:
            kaleido.stop_sync_server(silence_warnings=True)
    return n


def _texts(out: dict):
    if out.get("output_type") == "stream":
        yield "".join(out.get("text", ""))
    for key, value in out.get("data", {}).items():
        if key.startswith("text/"):
            yield "".join(value) if isinstance(value, list) else str(value)
    if out.get("output_type") == "error":
        yield "\n".join(out.get("traceback", []))


def problems(nb: dict, *, images: bool = True) -> list[str]:
    """What is wrong with a notebook's stored outputs: code cells not run in order, an error
    output, progress-bar text in any output, and (``images``) a plotly figure without a static
    ``image/png`` or ``image/svg+xml`` fallback. Works on plain JSON (``json.load``)."""
    found = []
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    if counts != list(range(1, len(code) + 1)):
        found.append(f"code cells not executed once, top to bottom (execution counts {counts})")
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: an error output ({out.get('ename')}: {out.get('evalue')})")
            for text in _texts(out):
                m = PROGRESS.search(text)
                if m:
                    found.append(f"cell {i}: progress-bar text {text[max(0, m.start() - 30):m.end() + 30]!r}")
                    break
            data = out.get("data", {})
            if images and PLOTLY in data and not any(k in data for k in STATIC):
                found.append(f"cell {i}: a plotly figure without a static image ({' or '.join(STATIC)})")
    if not any(cell.get("outputs") for cell in code):
        found.append("no outputs at all")
    return found


def run(path: Path, *, images: bool = True, timeout: int = CELL_TIMEOUT_S, out: Path | None = None) -> float:
    """Execute ``path`` and write it with its outputs to ``out`` (default: back over ``path``);
    returns the seconds it took. Without static images (``images=False``) the notebook is
    never written over a stored one (a code host would lose its figures): it is executed and
    checked, and written only to an explicit ``out``."""
    import nbformat

    if not images and out is None:
        raise ValueError("images=False writes only to an explicit out= path")
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        execute(nb, Path(tmp), timeout)
    seconds = time.perf_counter() - t0
    if images:
        add_static_images(nb)
    bad = problems(nb, images=images)
    if bad:
        raise SystemExit(f"{path}: not written: " + "; ".join(bad))
    nbformat.write(nb, out or path)
    return seconds


def execute_only(path: Path, *, timeout: int = CELL_TIMEOUT_S) -> float:
    """Execute ``path`` top to bottom (raising on an error) without writing anything."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        execute(nb, Path(tmp), timeout)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: .venv/bin/python scripts/run_notebooks.py notebooks/01_quickstart.ipynb")
    p.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebooks/*.ipynb)")
    p.add_argument("--no-images", action="store_true",
                   help="no static images (no kaleido needed): execute and check only, or write to --out; the "
                        "stored notebooks are never overwritten without their images")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write the executed notebooks into DIR instead of over the stored ones")
    p.add_argument("--chrome", default=None, help="the Chrome/Chromium kaleido uses (default: found on the system)")
    p.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help=f"seconds per cell (default {CELL_TIMEOUT_S})")
    p.add_argument("--check", action="store_true", help="only check the stored notebooks' outputs; run nothing")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if args.chrome:
        os.environ["BROWSER_PATH"] = args.chrome
    failed = 0
    for path in paths:
        if args.check:
            bad = problems(json.loads(path.read_text()), images=not args.no_images)
            print(f"{path}: {'ok' if not bad else '; '.join(bad)}")
            failed += bool(bad)
            continue
        if args.no_images and args.out is None:
            seconds = execute_only(path, timeout=args.timeout)
            print(f"{path}: executed in {seconds:.0f} s; not written (--no-images keeps the stored notebook and "
                  "its static images; pass --out DIR to keep these outputs)")
            continue
        target = None
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            target = args.out / path.name
        seconds = run(path, images=not args.no_images, timeout=args.timeout, out=target)
        print(f"{path}: executed in {seconds:.0f} s, written with its outputs to {target or path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
