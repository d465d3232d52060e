"""DESIGN.md's layers: the core never imports the layers above it; optional dependencies are imported lazily.

The layers, bottom up: the pure core (``ftrain/`` less the directories below); ``ftrain/recipes/`` (tasks written
on the core); ``ftrain/cli/`` and ``ftrain/__main__.py`` (the ``ftrain`` command, which runs recipes); and, beside
them, ``ftrain/trainer/`` (the HF-compatible shell over the core). Inside the core, the checkpoint package stays
below the compile layer (``ftrain.jit``).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ftrain

PACKAGE = Path(ftrain.__file__).parent
ABOVE_THE_CORE = ("trainer", "cli", "recipes")
COMMAND_ENTRY_POINT = PACKAGE / "__main__.py"  # `python -m ftrain`: runs ftrain.cli, so it is part of the command

# (file, module) pairs that break a rule on purpose, each with its reason.
ALLOWED = {
    # `ftrain.Trainer` / `ftrain.TrainingArguments`, imported on first attribute access, never on `import ftrain`.
    ("__init__.py", "ftrain.trainer"),
}


def _package_files(*parts: str) -> list[Path]:
    return sorted((PACKAGE.joinpath(*parts)).rglob("*.py"))


def _core_files() -> list[Path]:
    above = [PACKAGE / d for d in ABOVE_THE_CORE]
    return [p for p in _package_files() if p != COMMAND_ENTRY_POINT and not any(d in p.parents for d in above)]


def _package_of(path: Path, root: Path) -> list[str]:
    """``ftrain/checkpoint/treeio.py`` -> ``["ftrain", "checkpoint"]``: the package a relative import starts from."""
    return ["ftrain", *path.relative_to(root).parent.parts]


def _absolute(node: ast.ImportFrom, package: list[str]) -> str:
    if node.level == 0:
        return node.module
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _is_import_module_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    func = node.func
    return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == "import_module"


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every module ``path`` imports: ``import a.b``; ``from a import b`` (both ``a`` and
    ``a.b``, as ``b`` may be a module); relative imports, resolved; ``importlib.import_module("a.b")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, _package_of(path, root))
            found += [(node.lineno, module), *((node.lineno, f"{module}.{a.name}") for a in node.names)]
        elif _is_import_module_call(node):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def _violations(files: list[Path], forbidden: tuple[str, ...], root: Path = PACKAGE) -> list[str]:
    """``"ftrain/<file>:<line> imports <module>"`` for each import of a ``forbidden`` module (or one inside it)."""
    out = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        for line, name in _imports(path, root):
            hit = next((f for f in forbidden if name == f or name.startswith(f + ".")), None)
            if hit and (rel, hit) not in ALLOWED:
                out.add(f"ftrain/{rel}:{line} imports {name}")
    return sorted(out)


RULES = {
    "the core never imports the shell, the command or the recipes": (
        _core_files,
        ("ftrain.trainer", "ftrain.cli", "ftrain.recipes"),
    ),
    "recipes are written on the core: they never import the command or the shell": (
        lambda: _package_files("recipes"),
        ("ftrain.cli", "ftrain.trainer"),
    ),
    "the checkpoint package stays below the compile layer": (lambda: _package_files("checkpoint"), ("ftrain.jit",)),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_layering_rule(rule):
    files, forbidden = RULES[rule]
    assert len(files()) > 3  # the files were found
    violations = _violations(files(), forbidden)
    assert not violations, f"{rule}, but:\n  " + "\n  ".join(violations)


def test_the_import_scanner_sees_every_form_of_import(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    bad = checkpoint / "bad.py"
    bad.write_text(
        "import ftrain.jit\nfrom ftrain import jit\nfrom .. import jit as j\nfrom ..jit import Jitted\n"
        "import importlib\nimportlib.import_module('ftrain.jit')\nimport ftrain.jitter\n"
    )
    assert _violations([bad], ("ftrain.jit",), root=tmp_path) == [
        "ftrain/checkpoint/bad.py:1 imports ftrain.jit",
        "ftrain/checkpoint/bad.py:2 imports ftrain.jit",
        "ftrain/checkpoint/bad.py:3 imports ftrain.jit",
        "ftrain/checkpoint/bad.py:4 imports ftrain.jit",
        "ftrain/checkpoint/bad.py:4 imports ftrain.jit.Jitted",
        "ftrain/checkpoint/bad.py:6 imports ftrain.jit",
    ]


def test_importing_ftrain_does_not_import_optional_dependencies():
    optional = ("transformers", "datasets", "orbax", "tensorboard")
    code = f"import sys, ftrain; print(sorted(m for m in {optional!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
