"""The README's example runs as written."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # one session: later blocks use names from earlier ones
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["step"].logits.shape[1] == 1
    assert namespace["gen"].new_ids.shape[1] == 8
