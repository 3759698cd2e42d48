"""The residual-stream patching grid against one hooked forward per cell."""

from __future__ import annotations

import pytest
import torch

import notekv as nk
from notekv.sweep import resid_patch_grid
from conftest import tiny_model


def _pair(n: int = 22, at: int = 9):
    g = torch.Generator().manual_seed(5)
    corrupt = torch.randint(0, 250, (n,), generator=g).tolist()
    clean = list(corrupt)
    clean[at] = (clean[at] + 17) % 250
    clean[at + 2] = (clean[at + 2] + 3) % 250
    return corrupt, clean


def _metric(logits):
    return logits[:, 65] - logits[:, 66]


def _brute(model, corrupt, clean, layers, positions):
    run_k = model.run(torch.tensor([clean]), collect=[f"L{l}.resid_pre" for l in layers])
    out = torch.empty(len(layers), len(positions))
    for i, l in enumerate(layers):
        src = run_k.acts[f"L{l}.resid_pre"]
        for j, p in enumerate(positions):
            def fn(t, *, hook, p=p, src=src):
                t = t.clone()
                t[:, p] = src[:, p]
                return t
            r = model.run(torch.tensor([corrupt]), interventions=[nk.Hook(f"L{l}.resid_pre", fn)], logits="last")
            out[i, j] = _metric(r.logits[:, -1])[0]
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox"])
def test_grid_equals_one_forward_per_cell(arch):
    model = tiny_model(arch)
    corrupt, clean = _pair()
    layers = list(range(model.spec.n_layers))
    positions = list(range(len(corrupt)))
    fast = resid_patch_grid(model, corrupt, clean, _metric, block=4, progress=False)
    ref = _brute(model, corrupt, clean, layers, positions)
    assert fast.shape == (len(layers), len(positions))
    assert (fast - ref).abs().max() <= 1e-5
    # the patch changes something at the differing positions (the test can fail)
    assert (ref[:, 9] - ref[0, 0]).abs().max() > 1e-4


def test_grid_subset_and_order():
    model = tiny_model("llama")
    corrupt, clean = _pair()
    full = resid_patch_grid(model, corrupt, clean, _metric, progress=False)
    sub = resid_patch_grid(model, corrupt, clean, _metric, layers=[2, 0], slots=[21, 3, 9, 9], block=2,
                           progress=False)
    assert torch.allclose(sub, full[[2, 0]][:, [21, 3, 9, 9]], atol=1e-6)


def test_grid_bad_input():
    model = tiny_model("llama")
    corrupt, clean = _pair()
    with pytest.raises(ValueError, match="aligned prompts"):
        resid_patch_grid(model, corrupt, clean[:-1], _metric)
    with pytest.raises(IndexError, match="out of range"):
        resid_patch_grid(model, corrupt, clean, _metric, slots=[40])


def test_hooks_method_equals_lean_method():
    model = tiny_model("qwen3")
    corrupt, clean = _pair()
    lean = resid_patch_grid(model, corrupt, clean, _metric, method="lean", progress=False)
    hooks = resid_patch_grid(model, corrupt, clean, _metric, method="hooks", block=11, progress=False)
    assert (lean - hooks).abs().max() <= 1e-5
    dynamic = nk.tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="method='lean' cannot run"):
        resid_patch_grid(dynamic, corrupt, clean, _metric, method="lean")
    # the hooks method runs any family
    hooks_only = resid_patch_grid(dynamic, corrupt, clean, _metric, layers=[1], slots=[9, 20], progress=False)
    assert hooks_only.shape == (1, 2)
