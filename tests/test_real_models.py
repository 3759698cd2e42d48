"""The hook layer against plain HF forwards on the two bundled real models (fp32)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import notekv as nk
from notekv.hooks.canaries import run_canaries
from notekv.model.load import ModelNotFoundError, bundled_models

pytestmark = pytest.mark.slow

OLD = "Refunds only if delivered.\norder_status: delivered\nRefund request:"
NEW = "Refunds only if delivered.\norder_status: cancelled\nRefund request:"


def _parity(model, text):
    n = model.spec.n_layers
    sites = [f"L{l}.{s}" for l in range(n) for s in ("resid_post", "attn.k", "kv.k", "attn.v")]
    run = model.run(text, collect=sites)
    with torch.no_grad():
        plain = model.hf(input_ids=run.ids, output_hidden_states=True, use_cache=True)
    assert torch.allclose(run.logits, plain.logits, atol=1e-5, rtol=0)
    for l in range(n - 1):  # HF's last hidden state is after the final norm
        assert torch.allclose(run[f"L{l}.resid_post"], plain.hidden_states[l + 1], atol=1e-5, rtol=0), l
    final = nk.model.arch.get_submodule(model.hf, model.spec.layout.final_norm)
    assert torch.allclose(final(run[f"L{n - 1}.resid_post"]), plain.hidden_states[n], atol=1e-5)
    for l in range(n):
        keys, values = plain.past_key_values.layers[l].keys, plain.past_key_values.layers[l].values
        assert torch.allclose(run[f"L{l}.attn.k"], keys, atol=1e-5, rtol=0)
        assert torch.allclose(run[f"L{l}.kv.k"], keys, atol=1e-5, rtol=0)
        assert torch.allclose(run[f"L{l}.attn.v"], values, atol=1e-5, rtol=0)


def _kv_patch_restores_clean(model):
    old, new = model.tokenize(OLD), model.tokenize(NEW)
    assert len(old) == len(new)
    diff = [i for i, (a, b) in enumerate(zip(old.ids, new.ids)) if a != b]
    assert len(diff) == 1
    clean = model.run(NEW)
    corrupt = model.run(OLD)
    patched = model.run(OLD, interventions=[nk.KVPatch(clean, at=nk.Pos(diff))])
    assert (corrupt.logits[0, -1] - clean.logits[0, -1]).abs().max() > 0.1
    assert (patched.logits[0, -1] - clean.logits[0, -1]).abs().max() <= 1e-5


def _knockout(model):
    base = model.run(OLD)
    n = base.ids.shape[1]
    none = model.run(OLD, interventions=[nk.Knockout(src=nk.Pos([]), dst=nk.Last(), layers="all")])
    assert torch.equal(none.logits, base.logits)  # empty knockout: nothing registered differs
    # Every key except the sink (slot 0) for the decision query, at every layer.
    ko = model.run(OLD, interventions=[nk.Knockout(src=nk.Range(1, n), dst=nk.Last(), layers="all")])
    assert (ko.logits[0, -1] - base.logits[0, -1]).abs().max() > 0.1


def test_smollm2_sites_match_hf(smollm2):
    _parity(smollm2, OLD)


def test_smollm2_kv_patch_at_differing_token(smollm2):
    _kv_patch_restores_clean(smollm2)


def test_smollm2_knockout(smollm2):
    _knockout(smollm2)


def test_smollm2_canaries_and_spec(smollm2):
    res = run_canaries(smollm2)
    assert res["identity_max_diff"] == 0.0
    s = smollm2.spec
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (30, 9, 3, 64)
    assert s.rope[0].base == 1e5 and s.rope[0].rotary_dim == 64


def test_gemma3_sites_match_hf(gemma3):
    _parity(gemma3, "Refunds only if delivered.\norder_status: cancelled\nRefund request:")


def test_gemma3_spec_and_canaries(gemma3):
    s = gemma3.spec
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (18, 4, 1, 256)
    bases = {t: {r.base for r, lt in zip(s.rope, s.layer_types) if lt == t} for t in set(s.layer_types)}
    assert bases == {"sliding_attention": {1e4}, "full_attention": {1e6}}
    assert s.sliding_window == 512
    assert gemma3.tokenize("hi").tokens[0] == "<bos>"
    assert run_canaries(gemma3)["identity_max_diff"] == 0.0


def test_gemma3_kv_patch_at_differing_token(gemma3):
    _kv_patch_restores_clean(gemma3)


def test_loading_from_a_local_directory_and_errors(smollm2, tmp_path):
    from notekv.model.load import BUNDLED, dequantized_dir

    directory = dequantized_dir(BUNDLED["smollm2-135m"].locate())
    assert (directory / "model.safetensors").exists()
    again = nk.load(str(directory))
    assert torch.equal(again.run("hi there").logits, smollm2.run("hi there").logits)
    assert again.fingerprint == smollm2.fingerprint
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        nk.load(str(tmp_path / "nothing"))
    with pytest.raises(ModelNotFoundError, match="bundled"):
        nk.load("HuggingFaceTB/SmolLM2-135M")


def test_models_command_lists_bundled_models():
    names = {m["name"]: m["installed"] for m in bundled_models()}
    assert names == {"smollm2-135m": True, "gemma3-270m": True}
    out = subprocess.run([sys.executable, "-m", "notekv_cli", "models"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout
    assert "smollm2-135m" in out and "gemma3-270m" in out and "yes" in out


def test_demo_table_on_smollm2(smollm2):
    from circuits.demo import format_table, run_demo

    res = run_demo(smollm2, layers=[0])
    assert res.downstream == pytest.approx(1.0, abs=1e-4)  # field + everything after it = NEW's cache
    assert res.per_layer[0][1] == pytest.approx(1.0, abs=1e-4)  # layer-0 input at the field = NEW's tokens
    assert "recovery" in format_table(smollm2, res, "delivered", "cancelled")


@pytest.mark.slow
def test_a_load_prints_no_weight_loading_bar():
    """transformers' per-load progress bar stays off: a log of a run holds no bar per model load."""
    code = "import notekv as nk; m = nk.load('smollm2-135m'); print('loaded', m.spec.n_layers)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1])
    assert proc.stdout.strip() == "loaded 30"
    assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-500:]
