"""DESIGN.md rule 1: the core never imports the shell; optional dependencies are imported lazily."""

import ast
import subprocess
import sys
from pathlib import Path

import ftrain

PACKAGE = Path(ftrain.__file__).parent
SHELL = PACKAGE / "trainer"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_core_modules_never_import_the_trainer_shell():
    core_files = [p for p in PACKAGE.rglob("*.py") if SHELL not in p.parents]
    assert len(core_files) > 10
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith("ftrain.trainer"))
        for p in core_files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_ftrain_does_not_import_optional_dependencies():
    optional = ("transformers", "datasets", "orbax", "tensorboard")
    code = f"import sys, ftrain; print(sorted(m for m in {optional!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
