"""The layering rule: the plain layers (students, teachers, data, evaluation, errors, torch_files) never
import the distributed / tracking / remote-storage stack; only ``distillery/platform`` does.

Two checks: every import statement of those files (top-level, function-local, under TYPE_CHECKING,
and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name), and a fresh
interpreter that imports ``distillery.students``, builds ``rtdetrv4_tiny`` and runs one training
step, after which none of those packages may be in ``sys.modules`` (what a transitive import would
bring in).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "distillery"
PLAIN_LAYERS = ("students", "teachers", "data", "evaluation", "errors.py", "torch_files.py")
FORBIDDEN = ("ray", "deepspeed", "mlflow", "fsspec", "s3fs", "distillery.platform")


def _plain_files() -> list[Path]:
    files = []
    for layer in PLAIN_LAYERS:
        path = PACKAGE / layer
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _module_of(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``), at any depth."""
    module, is_package = _module_of(path, root), path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(name: str) -> str | None:
    return next((f for f in FORBIDDEN if name == f or name.startswith(f + ".")), None)


def layering_violations(files: list[Path]) -> list[str]:
    """``file:line imports X`` for every forbidden import in ``files``."""
    out = []
    for path in files:
        for line, name in imported_modules(path):
            if _forbidden(name):
                out.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return sorted(set(out))


def test_plain_layers_import_no_platform_stack():
    files = _plain_files()
    assert len(files) > 20, files  # the layers are where this test thinks they are
    violations = layering_violations(files)
    assert not violations, "plain layers must not import " + ", ".join(FORBIDDEN) + ":\n" + "\n".join(violations)


@pytest.mark.parametrize("statement", [
    "import ray",
    "from deepspeed.runtime import engine",
    "import mlflow.tracking as t",
    "from distillery.platform.io import storage",
    "from ..platform.io import storage",
    "import importlib\nimportlib.import_module('fsspec')",
])
def test_scan_names_a_forbidden_import_inside_a_function(tmp_path, statement):
    bad = tmp_path / "distillery" / "students" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def build():\n" + textwrap.indent(statement, "    ") + "\n")
    found = [(line, name) for line, name in imported_modules(bad, tmp_path) if _forbidden(name)]
    assert found and found[0][0] >= 2, found


def test_relative_imports_resolve_to_absolute_names():
    path = PACKAGE / "students" / "detector.py"  # "from .decoder import ..." and an absolute import
    names = {name for _, name in imported_modules(path)}
    assert "distillery.students.decoder" in names and "distillery.torch_files" in names, sorted(names)


_TRAIN_ONE_STEP = """
import json, sys
import torch
import distillery.students
from distillery.students import build_criterion, build_student
from distillery.students.training import train_step

torch.manual_seed(0)
model = build_student("rtdetrv4_tiny", num_classes=3).train()
criterion = build_criterion(num_classes=3)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = {"images": torch.rand(2, 3, 64, 64),
         "targets": [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
                     {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]}
result = train_step(model, criterion, batch, backward=lambda loss: loss.backward(), step=optimizer.step)
assert torch.isfinite(result.total), result.total
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_ROOTS
                        or m.startswith("distillery.platform"))))
"""


def test_student_train_step_loads_no_platform_stack():
    roots = sorted({f.split(".")[0] for f in FORBIDDEN if not f.startswith("distillery")})
    code = f"FORBIDDEN_ROOTS = {roots!r}\n" + _TRAIN_ONE_STEP
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing distillery.students and one train step loaded {loaded}"
