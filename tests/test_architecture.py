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
    assert len(kinds) >= 3, kinds   # distill, moe_tune, teacher_pretrain (each its own package)
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


_TOY_SPEC = '''
from dataclasses import dataclass
from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.engine.checkpoints import CheckpointRecord
from distillery.platform.engine.run_spec import RunDescription
from distillery.platform.engine.spec import JobSpec


@dataclass(kw_only=True)
class ToyRun(RunDescription):
    width: int


@dataclass
class ToyRecord(CheckpointRecord):
    note: str = ""


SPEC = JobSpec(name="toy_job", config_class=MoETuneConfig, run_class=ToyRun, record_class=ToyRecord,
               job="toyjobs.job:ToyJob", driver="toyjobs.driver:ToyDriver")
'''
_TOY_JOB = '''
from distillery.platform.engine.trainer import TrainingJob
from toyjobs.spec import SPEC


class ToyJob(TrainingJob):
    spec = SPEC
'''
_TOY_DRIVER = '''
from distillery.platform.engine.driver import JobDriver
from toyjobs.spec import ToyRun


class ToyDriver(JobDriver):
    def describe_run(self, **common):
        return ToyRun(width=3, **common)
'''


def test_a_new_job_is_one_package_and_one_registration_line(tmp_path, monkeypatch):
    """A job written as a package of three files (spec, worker-side job, driver steps) and one
    line in the registry: the sweep accepts it by kind, the engine carries it to a worker by its
    spec, and its checkpoints are told apart from the other jobs' (nothing of Ray runs here)."""
    import json

    import pytest

    from distillery.platform import jobs
    from distillery.platform.engine.checkpoints import CheckpointError, EngineState, read_record, save_checkpoint_files
    from distillery.platform.engine.run_spec import from_worker_config, worker_config
    from distillery.tuning.sweep_config import SweepConfig

    package = tmp_path / "toyjobs"
    package.mkdir()
    for name, text in (("__init__", ""), ("spec", _TOY_SPEC), ("job", _TOY_JOB), ("driver", _TOY_DRIVER)):
        (package / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(jobs, "JOB_SPEC_MODULES", (*jobs.JOB_SPEC_MODULES, "toyjobs.spec"))   # the one line
    jobs.job_specs.cache_clear()
    try:
        spec = jobs.job_spec("toy_job")
        assert SweepConfig.model_validate({"trial": {"job": "toy_job"}}).trial.job == "toy_job"
        with pytest.raises(ValueError, match="unknown job 'no_such_job'"):
            SweepConfig.model_validate({"trial": {"job": "no_such_job"}})
        run = spec.run_class(width=3, steps_per_epoch=1, val_annotations="a", val_images="b", run_storage="c")
        config = json.loads(json.dumps(worker_config(spec, spec.config_class(), run)))
        job_class = load_attribute(config["job"])   # what the engine's train_worker does
        assert job_class.__name__ == "ToyJob" and from_worker_config(config, job_class.spec)[1] == run
        assert issubclass(load_attribute(spec.driver), JobDriver)
        save_checkpoint_files(tmp_path, 0, EngineState(0), spec.record_class(epoch=0, note="n"), spec.name)
        assert read_record(tmp_path, spec).note == "n"
        with pytest.raises(CheckpointError, match="written by the toy_job job"):
            read_record(tmp_path, next(s for s in jobs.job_specs().values() if s is not spec))
    finally:
        jobs.job_specs.cache_clear()


_TOY_FAMILY = '''
import dataclasses

from distillery.students.detector import spec_from_overrides
from distillery.students.families import StudentFamily
from distillery.students.rtdetrv4 import STUDENT_SPECS, build_from_spec

SPECS = {"toydetr_s": dataclasses.replace(STUDENT_SPECS["rtdetrv4_tiny"], num_queries=12)}


def build(name, **overrides):
    return build_from_spec(spec_from_overrides(SPECS, name, overrides, who="toydetr"))


FAMILY = StudentFamily("ToyDETR", SPECS, build, criterion_options={"toydetr_s": {"use_union_set": False}})
'''


def test_a_new_student_family_is_one_module_and_one_registration_line(tmp_path, monkeypatch):
    """A family module (its sizes, builder and official loss settings) and one line in
    ``students/families.py``: build_student builds it and it trains a step, the distillation config
    accepts its size and resolves its criterion, and an unknown size is named with the known ones."""
    import pytest
    import torch

    from distillery.platform.config.distill import DistillConfig
    from distillery.platform.config.sections import load_config
    from distillery.students import build_criterion, build_student, families
    from distillery.students.training import train_step

    (tmp_path / "toydetr.py").write_text(_TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "FAMILY_MODULES", (*families.FAMILY_MODULES, "toydetr"))   # the one line
    families.families.cache_clear()
    try:
        cfg = load_config(DistillConfig, None, ["student.name=toydetr_s"])
        assert cfg.criterion_options() == {"use_union_set": False}
        model = build_student("toydetr_s", num_classes=3, teacher_dim=None)
        assert model.spec.num_queries == 12 and families.family_of("toydetr_s").name == "ToyDETR"
        criterion = build_criterion(num_classes=3, **cfg.criterion_options())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
        result = train_step(model.train(), criterion, {"images": torch.rand(2, 3, 64, 64), "targets": targets},
                            backward=lambda loss: loss.backward(), step=optimizer.step)
        assert torch.isfinite(result.total) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        with pytest.raises(KeyError, match="toydetr_s"):   # the error lists the new size among the known ones
            families.family_of("toydetr_xl")
    finally:
        families.families.cache_clear()
