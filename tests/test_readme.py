"""The README's example runs as written (shortened to 5 steps) and trains."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.compiled
def test_readme_pure_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    code = blocks[0].replace("range(100)", "range(5)")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert int(namespace["state"].step) == 5
    assert namespace["train_step"].recompiles == 0
    assert namespace["exported"].lm_head.weight is namespace["exported"].wte.weight
