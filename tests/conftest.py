import os
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import notekv as nk  # noqa: E402

TINY_ARCHS = ["llama", "mistral", "qwen3", "gemma3_text", "gpt_neox"]


@pytest.fixture(scope="session")
def smollm2():
    return nk.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_bf16():
    return nk.load("smollm2-135m", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def gemma3():
    return nk.load("gemma3-270m")


_tiny_cache: dict = {}


def tiny_model(arch: str):
    if arch not in _tiny_cache:
        _tiny_cache[arch] = nk.tiny(arch)
    return _tiny_cache[arch]


@pytest.fixture(params=TINY_ARCHS)
def tiny(request):
    return tiny_model(request.param)


def random_pair(seed=0, n=20, edit=(8,)):
    """OLD / NEW token id lists of length ``n`` (random ids), NEW differing at ``edit``."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randint(3, 250, (n,), generator=g).tolist()
    new = list(old)
    for i in edit:
        new[i] = (new[i] + 7) % 250 + 3
    return old, new


def prefix_caches(model, old, new):
    """KV caches of OLD and NEW without their last (decision) token."""
    from notekv.kv import KVCache

    return [KVCache.from_run(model.run(torch.tensor([ids[:-1]])), model) for ids in (old, new)]


def count_hooks(module: torch.nn.Module) -> int:
    """All forward hooks and pre-hooks registered anywhere under ``module``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# Byte-level tiny tokenizer: values must have equal character length.
TINY_TOML = textwrap.dedent('''
    name = "tiny_gate"
    kind = "gate"
    field = "status"
    positive_values = ["good"]
    negative_values = ["bad!", "lost"]
    answers = { positive = "Y", negative = "N" }
    policy = "Allow only if status is good."
    shots = 2
    example = "#{id} status: {value}. go -> {answer}\\n"
    query = "#{id} status: {value}. go ->"
''')


@pytest.fixture()
def tiny_scenario(tmp_path):
    path = tmp_path / "tiny_gate.toml"
    path.write_text(TINY_TOML)
    from circuits import scenarios

    return scenarios.get(path)
