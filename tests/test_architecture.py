"""The engine knows no job: ``distillery/platform/engine/`` imports nothing from a job package
(``distill``, ``moe``, ``teacher_pretrain``) nor the job registry, and spells no job's kind or
module path; every job's kind is spelled once, in its package's spec module
(``distillery.platform.jobs`` lists those modules).

An ast scan of the source (function-local imports included, ``tests/test_layering.py``'s reader),
without importing it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from distillery.platform.engine.driver import JobDriver
from distillery.platform.engine.spec import load_attribute
from distillery.platform.jobs import JOB_SPEC_MODULES, job_specs
from test_layering import imported_modules

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "distillery" / "platform" / "engine"
JOB_PACKAGES = ("distillery.platform.distill", "distillery.platform.moe", "distillery.platform.teacher_pretrain",
                "distillery.platform.jobs")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (prose may name a job; code may not)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant of ``path`` but its docstrings (f-string parts included)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip]


def engine_violations(root: Path, files: list[Path], kinds: list[str]) -> list[str]:
    out = []
    for path in files:
        where = path.relative_to(root)
        for line, name in imported_modules(path, root):
            if any(name == p or name.startswith(p + ".") for p in JOB_PACKAGES):
                out.append(f"{where}:{line} imports {name}")
        for line, value in string_literals(path):
            if value in kinds or any(p in value for p in JOB_PACKAGES):
                out.append(f"{where}:{line} names the job {value!r}")
    return sorted(set(out))


def test_the_engine_imports_and_names_no_job():
    files = sorted(ENGINE.glob("*.py"))
    assert len(files) >= 8, files   # the engine is where this test thinks it is
    kinds = list(job_specs())
    assert len(kinds) >= 2, kinds
    violations = engine_violations(REPO, files, kinds)
    assert not violations, "the engine must know no job:\n" + "\n".join(violations)


def test_the_scan_finds_a_job_in_an_engine_module(tmp_path):
    engine = tmp_path / "distillery" / "platform" / "engine"
    engine.mkdir(parents=True)
    bad = engine / "bad.py"
    bad.write_text(textwrap.dedent('''
        """A docstring may say distill."""
        def build(kind):
            from ..distill.spec import SPEC
            if kind == "moe_tune":
                return "distillery.platform.moe.job:MoETuneJob"
    '''))
    found = engine_violations(tmp_path, [bad], ["distill", "moe_tune"])
    assert len(found) == 4, found   # the import (module and name), the kind, the path; not the docstring
    assert any("imports distillery.platform.distill.spec" in f for f in found)
    assert any("'moe_tune'" in f for f in found)


def _python_files() -> list[Path]:
    return sorted((REPO / "distillery").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py"))


def test_each_job_kind_is_spelled_once_in_its_spec():
    specs = job_specs()
    assert list(specs) == [__import__(m, fromlist=["SPEC"]).SPEC.name for m in JOB_SPEC_MODULES]
    spelled: dict[str, list[str]] = {kind: [] for kind in specs}
    for path in _python_files():
        for line, value in string_literals(path):
            if value in spelled:
                spelled[value].append(f"{path.relative_to(REPO)}:{line}")
    for kind, module in zip(specs, JOB_SPEC_MODULES):
        expected = module.replace(".", "/") + ".py"
        assert [s.split(":")[0] for s in spelled[kind]] == [expected], (kind, spelled[kind])
        spec, package = specs[kind], module.rsplit(".", 1)[0] + "."
        assert spec.job.startswith(package) and spec.driver.startswith(package)   # both live in its package
        assert spec.job_class().spec is spec and issubclass(load_attribute(spec.driver), JobDriver)


def package_imports(root: Path) -> dict[str, set[str]]:
    """package -> the other packages of ``distillery/platform`` it imports (any depth, any file)."""
    platform = root / "distillery" / "platform"
    edges: dict[str, set[str]] = {}
    for path in sorted(platform.rglob("*.py")):
        package = path.relative_to(platform).parts[0].removesuffix(".py")
        for _, name in imported_modules(path, root):
            parts = name.split(".")
            if parts[:2] == ["distillery", "platform"] and len(parts) > 2 and parts[2] != package:
                edges.setdefault(package, set()).add(parts[2])
    return edges


def test_no_two_platform_packages_import_each_other():
    edges = package_imports(REPO)
    assert {"engine", "cache", "datasets", "distill", "moe"} <= set(edges), sorted(edges)
    circles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert not circles, f"packages that import each other: {circles}"
