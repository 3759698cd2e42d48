"""The capability matrix, measured: every check on every family's tiny model, the README's
matrix equal to what ``notekv families`` prints, ``notekv check`` on a model directory, and
the bundled real models checked wherever their family's tiny model says yes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import notekv as nk
from notekv.capabilities import CHECKS, check_model, format_matrix
from notekv.model.arch import FAMILIES, UnsupportedArchitectureError, arch_spec
from notekv.model.tiny import TINY_CONFIGS
from notekv_cli.app import main

ROOT = Path(__file__).parents[1]

SEED = random.SystemRandom().randrange(2**31)
_rows: dict = {}


_models: dict = {}


def model_of(arch: str):
    if arch not in _models:
        _models[arch] = nk.tiny(arch)
    return _models[arch]


def row_of(arch: str):
    if arch not in _rows:
        _rows[arch] = check_model(model_of(arch), label=arch, seed=SEED)
    return _rows[arch]


def _explain(row) -> str:
    return f"seed {row.seed}: " + "; ".join(f"{k}: {c.detail}" for k, c in row.failed.items())


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_every_cell_is_exact_or_refused(arch):
    row = row_of(arch)
    assert set(row.cells) == set(CHECKS)
    assert not row.failed, _explain(row)
    for name, cell in row.cells.items():
        if cell.status == "refused":
            assert row.model_type in cell.detail, f"{arch} {name}: a refusal must name the family: {cell.detail}"


def test_the_zoo_covers_the_kinds():
    """At least 20 families, and among them every kind of cache the paper validated, read off
    the built models' specs (not off the names)."""
    specs = {arch: model_of(arch).spec for arch in TINY_CONFIGS}
    types = {s.model_type for s in specs.values()}
    assert len(types) >= 20 and types <= set(FAMILIES)

    def kind(test) -> set:
        return {s.model_type for s in specs.values() if test(s)}

    assert len(kind(lambda s: s.moe_layers)) >= 3, "mixture of experts"
    assert len(kind(lambda s: s.layout.kv_expand)) >= 1, "latent attention"
    assert len(kind(lambda s: s.layout.text_config and s.layout.explicit_positions)) >= 1, "multimodal RoPE"
    assert len(kind(lambda s: s.layout.attn_sinks)) >= 1, "attention sinks"
    assert len(kind(lambda s: any(s.window_of(l) for l in range(s.n_layers)))) >= 2, "sliding windows"
    assert len(kind(lambda s: s.layout.positions == "learned")) >= 1, "absolute positions"
    assert len(kind(lambda s: s.layout.recurrent)) >= 1, "state-space hybrid"


def test_shift_is_exact_on_every_rotary_family():
    """Repositioning is measured on every family (random offsets per run) and refused only
    where keys carry no rotation."""
    refused = {a for a in TINY_CONFIGS if row_of(a).cells["shift"].status == "refused"}
    rotary = [a for a in TINY_CONFIGS if a not in refused]
    assert {row_of(a).model_type for a in refused} <= {"gpt2", "jamba", "falcon_h1"}, refused
    assert all(row_of(a).cells["shift"].status == "yes" for a in rotary)


def test_readme_matrix_is_what_notekv_families_prints(capsys):
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- families matrix")
    block = text[text.index("\n", start) + 1 : text.index("<!-- end families matrix -->")]
    printed = format_matrix([row_of(a) for a in TINY_CONFIGS])
    assert block.strip() == printed.strip()
    assert main(["families", "--only", "llama", "gemma3_text"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == format_matrix([row_of("llama"), row_of("gemma3_text")]).strip()


def test_check_on_a_model_directory(tmp_path, capsys):
    model = nk.tiny("qwen3")
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    assert main(["check", str(tmp_path), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "canaries: identity_max_diff 0" in out
    assert "| `" in out and "FAILED" not in out


def test_an_unknown_family_is_told_which_row_to_add():
    hf = nk.tiny("llama").hf
    real = hf.config.model_type
    hf.config.model_type = "mystery"
    try:
        with pytest.raises(UnsupportedArchitectureError, match=r"FAMILIES\['mystery'\] = FAMILIES\['llama'\]"):
            arch_spec(hf)
    finally:
        hf.config.model_type = real


def test_check_of_a_missing_model_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check", "no/such/model-dir"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no/such/model-dir" in err


@pytest.mark.parametrize("fixture, family", [("smollm2", "llama"), ("gemma3", "gemma3_text")])
def test_real_weights_do_what_their_family_does(request, fixture, family):
    model = request.getfixturevalue(fixture)
    tiny_row = row_of(family)
    real = check_model(model, seed=SEED)
    assert not real.failed, _explain(real)
    for name, cell in tiny_row.cells.items():
        assert real.cells[name].status == cell.status, f"{model.name} {name}: {real.cells[name]} vs tiny {cell}"


def test_an_attention_kernel_the_family_lacks_is_an_input_error(tmp_path):
    model = nk.tiny("gemma2")
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(nk.InputError, match="attn_implementation='sdpa'.*'eager'"):
        nk.load(str(tmp_path), attn_implementation="sdpa")
    assert nk.load(str(tmp_path)).spec.model_type == "gemma2"


def _no_op(*args, **kwargs):
    return nk.Steer("L0.resid_pre", torch.zeros(nk.tiny("llama").spec.d_model))


@pytest.mark.parametrize("check, target, broken", [
    ("Knockout", "Knockout", _no_op),
    ("KVPatch", "KVPatch", _no_op),
    ("Patch", "Patch", _no_op),
    ("Ablate", "Ablate", _no_op),
])
def test_a_check_fails_when_the_operation_does_nothing(monkeypatch, check, target, broken):
    from notekv.capabilities import CheckFailed, Probe, checks

    monkeypatch.setattr(checks, target, broken)
    with pytest.raises(CheckFailed):
        CHECKS[check](Probe.of(nk.tiny("llama"), seed=5))


def test_the_shift_check_fails_when_keys_are_not_moved(monkeypatch):
    from notekv.capabilities import CheckFailed, Probe
    from notekv.kv import KVCache

    monkeypatch.setattr(KVCache, "reposition", lambda self, delta=None, **kw: self)
    with pytest.raises(CheckFailed, match="shift by"):
        CHECKS["shift"](Probe.of(nk.tiny("llama"), seed=5))


def test_families_json_gives_each_cell_with_its_measured_error(capsys):
    import json

    assert main(["families", "--only", "llama", "--json", "--seed", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["label"] == "llama" and row["seed"] == 4 and set(row["cells"]) == set(CHECKS)
    assert all(c["status"] == "yes" and 0 <= c["error"] <= 2e-2 for c in row["cells"].values()), row
