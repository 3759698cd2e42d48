"""One error policy: bad input at a public entry point raises notekv's ``InputError`` (or a
subclass) naming the argument, never a bare ``ValueError`` / ``IndexError`` / ``TypeError``
/ ``KeyError`` from notekv or from deep inside torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import notekv as nk
from conftest import tiny_model
from notekv.attribution import exact_kv
from notekv.runner import KVMix, RowInterventions, run_variants
from notekv.sweep import resid_patch_grid

ROOT = Path(__file__).parents[1]
BARE = {"ValueError", "IndexError", "TypeError", "KeyError"}


def test_no_bare_builtin_error_is_raised_anywhere_in_the_packages():
    """Static: no ``raise ValueError(...)`` (or IndexError/TypeError/KeyError) in notekv, the
    application packages or the CLI; each such error is one of notekv's classes."""
    found = []
    for pkg in ("notekv", "circuits", "evals", "notekv_cli"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                        and isinstance(node.exc.func, ast.Name) and node.exc.func.id in BARE:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} raises {node.exc.func.id}")
    assert not found, "\n".join(found)


TEXT = "order_status: shipped. Refund?"
OTHER = "order_status: stopped. Refund?"


def _cases(m):
    old = m.run(TEXT, logits="last").kv
    new = m.run(OTHER, logits="last").kv
    ids = list(m.tokenize(TEXT).ids)
    metric = lambda lg: lg[:, 1] - lg[:, 2]  # noqa: E731
    return [
        ("patch_sweep site", lambda: nk.patch_sweep(m, TEXT, OTHER, answers=(1, 2), site="resid"), "site"),
        ("patch_sweep answers and metric", lambda: nk.patch_sweep(m, TEXT, OTHER), "answers"),
        ("patch_sweep block", lambda: nk.patch_sweep(m, TEXT, OTHER, answers=(1, 2), block=0), "block"),
        ("patch_sweep slot", lambda: nk.patch_sweep(m, TEXT, OTHER, answers=(1, 2), slots=[999]), "slots"),
        ("patch_sweep layer", lambda: nk.patch_sweep(m, TEXT, OTHER, answers=(1, 2), layers=[99]), "layers"),
        ("patch_sweep unaligned", lambda: nk.patch_sweep(m, TEXT, TEXT + " more", answers=(1, 2)), "equal"),
        ("patch_sweep empty ids", lambda: nk.patch_sweep(m, [], [], answers=(1, 2)), "empty"),
        ("resid grid method", lambda: resid_patch_grid(m, ids, ids, metric, method="fast"), "method"),
        ("resid grid unaligned", lambda: resid_patch_grid(m, ids, ids[:-1], metric), "equal token length"),
        ("exact_kv cell", lambda: exact_kv(m, old, new, 1, 1, 2, [(0, 999)]), "slot"),
        ("exact_kv shapes", lambda: exact_kv(m, old, old.select(range(3)), 1, 1, 2, [(0, 1)]), "same shape"),
        ("runner method", lambda: run_variants(m, [1], KVMix.of_slots(new, torch.zeros(1, old.n_layers, len(old))),
                                               metric, past=old, method="fast"), "method"),
        ("runner no tokens", lambda: run_variants(m, [], RowInterventions(1, lambda r: []), metric), "tokens"),
        ("runner mask shape", lambda: KVMix.of_slots(new, torch.zeros(1, 2)), "masks"),
        ("runner which", lambda: KVMix.of_cells(new, [(0, 1, None)], which="q"), "which"),
        ("token_id of a phrase", lambda: m.token_id("two words"), "single token"),
        ("run logits", lambda: m.run(TEXT, logits="first"), "logits"),
        ("run past of wrong type", lambda: m.run(TEXT, past="cache"), "past"),
        ("reposition positions", lambda: old.reposition(positions=[1, 2]), "positions"),
        ("expand batch", lambda: old.expand(2).expand(3), "expand"),
        ("uncollected site", lambda: m.run(TEXT)["L0.resid_pre"], "not collected"),
        ("Ablate kind", lambda: nk.Ablate("L0.resid_pre", kind="median"), "kind"),
        ("KVPatch which", lambda: nk.KVPatch(old, which="q"), "which"),
        ("Hook fn", lambda: nk.Hook("L0.resid_pre", 3), "callable"),
        ("KVPatch source type", lambda: m.run(TEXT, interventions=[nk.KVPatch(torch.zeros(3))]), "KVPatch source"),
        ("interventions file", lambda: nk.load_interventions(ROOT / "README.md"), ""),
        ("compose engine", lambda: nk.compose(m, TEXT, [], "x", engine="turbo"), "engine"),
        ("splice parts", lambda: nk.splice(m, [3]), "part"),
    ]


def test_public_entry_points_raise_input_errors_for_bad_input():
    m = tiny_model("llama")
    wrong = []
    for name, call, word in _cases(m):
        try:
            call()
        except nk.InputError as e:
            if word and word not in str(e):
                wrong.append(f"{name}: message does not name {word!r}: {e}")
        except Exception as e:  # noqa: BLE001 - the point is to catch what leaks
            wrong.append(f"{name}: {type(e).__module__}.{type(e).__name__}: {e}")
        else:
            wrong.append(f"{name}: no error")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("cls,builtin", [(nk.InputError, ValueError), (nk.CacheMismatchError, ValueError),
                                         (nk.PositionError, IndexError), (nk.SourceError, TypeError)])
def test_input_errors_keep_their_builtin_bases(cls, builtin):
    assert issubclass(cls, nk.InputError) and issubclass(cls, builtin)
