"""The packages' floors: every import, at module level or inside a function, points down.

notekv (the library) < circuits and evals (applications; evals may read circuits.scenarios)
< notekv_cli (the command line). Read from the source with ``ast``: nothing is imported.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("notekv", "circuits", "evals", "notekv_cli")
# Deprecated re-exports of the command line's old homes, kept one release: each may import
# notekv_cli and nothing else of the application floors, and no module imports them.
SHIMS = {"circuits.cli", "circuits.cli_args", "evals.cli_compose", "evals.cli_edits"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(absolute module or module.name, line)`` of every import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def _under(name: str, *roots: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _upward(module: str, target: str) -> bool:
    """Whether ``module`` importing ``target`` breaks the floors."""
    if _under(module, "notekv"):
        return _under(target, "circuits", "evals", "notekv_cli")
    if module in SHIMS:
        return _under(target, "circuits", "evals")
    if _under(module, "circuits"):
        return _under(target, "evals", "notekv_cli")
    if _under(module, "evals"):
        return _under(target, "notekv_cli") or (_under(target, "circuits") and not _under(target, "circuits.scenarios"))
    return False


def test_every_import_points_down():
    graph = _graph()
    assert {"notekv", "circuits", "circuits.scenarios", "evals", "notekv_cli"} <= set(graph)
    bad = [f"{m} (line {line}) imports {t}" for m, imps in graph.items() for t, line in imps if _upward(m, t)]
    assert not bad, "imports against the floors:\n  " + "\n  ".join(bad)


def test_nothing_imports_the_deprecated_shims():
    bad = [f"{m} (line {line}) imports {t}" for m, imps in _graph().items() if m not in SHIMS
           for t, line in imps if any(_under(t, s) for s in SHIMS)]
    assert not bad, "modules importing a deprecated shim:\n  " + "\n  ".join(bad)


def test_the_rule_sees_an_upward_import():
    assert _upward("notekv.sweep", "circuits.scenarios.Pair")
    assert _upward("circuits.report", "evals.compose")
    assert _upward("evals.edits", "circuits.sweeps")
    assert not _upward("evals.edit_cases", "circuits.scenarios")
    assert _upward("evals.compose", "notekv_cli.args")
    assert not _upward("notekv_cli.main", "circuits.report")
    assert _upward("circuits.cli", "circuits.report") and not _upward("circuits.cli", "notekv_cli.main")


def test_the_deprecated_paths_still_work():
    import importlib
    import sys

    import pytest

    import notekv_cli
    import notekv_cli.args

    for name, attr, same in (("circuits.cli", "main", notekv_cli.main),
                             ("circuits.cli_args", "count", notekv_cli.args.count)):
        sys.modules.pop(name, None)
        with pytest.warns(DeprecationWarning, match="notekv_cli"):
            assert getattr(importlib.import_module(name), attr) is same
    for name in ("evals.cli_compose", "evals.cli_edits"):
        sys.modules.pop(name, None)
        with pytest.warns(DeprecationWarning, match="notekv_cli"):
            assert callable(importlib.import_module(name).add_parser)


def test_the_readme_support_table_is_the_generated_one(capsys):
    """The support table in the README is what the site map generates, and `notekv support` prints it."""
    from notekv.hooks.sitemap import format_support_table
    from notekv_cli import main

    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- support table")
    block = text[text.index("\n", start) + 1 : text.index("<!-- end support table -->")]
    assert block.strip() == format_support_table().strip()
    assert main(["support"]) == 0
    assert capsys.readouterr().out.strip() == format_support_table().strip()
