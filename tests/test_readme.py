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


def test_ci_runs_the_readme_test_command_with_the_pinned_environment():
    """CI must run the test command the README gives a new user, and both install from constraints.txt."""
    text = README.read_text()
    section = text[text.index("## Two commands") :]
    commands = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert "-c constraints.txt" in test_command
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    pins = (README.parent / "constraints.txt").read_text()
    for name in ("transformers", "datasets", "accelerate", "optuna", "ray", "torch"):
        assert re.search(rf"^{name}==\S+$", pins, flags=re.M), f"constraints.txt pins no {name}"
