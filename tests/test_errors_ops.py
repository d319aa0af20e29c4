"""Operations, table-driven where it fits: ``models:/`` URIs resolved on the driver against the
jobs' own store (never creating one), ``student.weights=<run dir>``, faults that end in one
``error:`` line naming the path (a read-only output directory, a full disk, ``predict --out``
naming a file), two jobs with one ``output.name``, and the checks a multi-node cluster needs at
start. Every case asserts the FIRST LINE names the URI, path or key, and that nothing was
half-written. No case starts Ray: each calls the function the job calls."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from distillery.platform.config.distill import DistillConfig
from distillery.platform.config.sections import load_config
from distillery.platform.errors import DeterministicError, UserFacingError

SIZE = 64
OVERRIDES = {"num_queries": 10, "num_denoising": 4}
NAMES = ["circle", "square"]


@pytest.fixture(autouse=True)
def _mlflow_globals_restored(monkeypatch):
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tiny_student():
    from distillery.students import build_student

    torch.manual_seed(0)
    return build_student("rtdetrv4_tiny", num_classes=len(NAMES), eval_spatial_size=SIZE, dsi=False,
                         teacher_dim=None, **OVERRIDES)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A job home ``<home>/runs/mlflow.db`` (the jobs' default store) with one registered model,
    ``tiny-student`` version 1 (alias ``champion``), whose run holds ``export/`` as the jobs log it."""
    import yaml
    from mlflow.tracking import MlflowClient
    from safetensors.torch import save_file

    from distillery.platform.tracking.runs import create_run

    home = tmp_path_factory.mktemp("home")
    (home / "runs").mkdir()
    uri = f"sqlite:///{home / 'runs' / 'mlflow.db'}"
    run_id = create_run(uri, "distillery", "trained", {})
    export = home / "staging" / "export"
    export.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in _tiny_student().state_dict().items()}, str(export / "weights.safetensors"))
    (export / "meta.json").write_text(json.dumps({"student": "rtdetrv4_tiny", "input_size": SIZE,
                                                  "category_ids": [0, 1], "category_names": NAMES}))
    (home / "staging" / "config.yaml").write_text(yaml.safe_dump({"student": {"overrides": OVERRIDES}}))
    client = MlflowClient(uri, registry_uri=uri)
    client.log_artifacts(run_id, str(export), "export")
    client.log_artifact(run_id, str(home / "staging" / "config.yaml"))
    client.create_registered_model("tiny-student")
    version = client.create_model_version("tiny-student", f"runs:/{run_id}/export", run_id=run_id)
    client.set_registered_model_alias("tiny-student", "champion", version.version)
    return home, uri


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco(root, train=1, val=2, size=64, seed=3)
    return root / "images" / "val"


def _stores(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.db"))


# --------------------------------------------------------------------------- models:/ in predict
def test_predict_finds_the_jobs_registry_without_a_tracking_uri(registry, images, tmp_path, monkeypatch):
    from distillery.platform.serving.predict import main

    home, _ = registry
    monkeypatch.chdir(home)  # where the jobs ran: runs/mlflow.db, found as the jobs find it
    summary = main(["--model", "models:/tiny-student@champion", "--images", str(images), "--out", str(tmp_path / "p"),
                    "--device", "cpu"])
    assert summary["student"] == "rtdetrv4_tiny" and summary["images"] == 2
    dataset = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert [c["name"] for c in dataset["categories"]] == NAMES
    assert _stores(home) == [home / "runs" / "mlflow.db"] and not (home / "mlruns").exists()


PREDICT_REGISTRY_CASES = [
    # (id, model URI, --tracking-uri (None: the default rule), what the first line must say)
    ("no store here", "models:/tiny-student@champion", None, "no MLflow store at {cwd}/runs/mlflow.db"),
    ("no such model", "models:/other@champion", "{store}", "no registered model 'other' in the store {store}"),
    ("no such alias", "models:/tiny-student@staging", "{store}", "has no alias 'staging' in the store {store}"),
    ("no such version", "models:/tiny-student/7", "{store}", "has no version 7 in the store {store}"),
    ("malformed", "models:/tiny-student", "{store}", "expected models:/<name>@<alias> or models:/<name>/<version>"),
    ("store file missing", "models:/tiny-student@champion", "sqlite:///{cwd}/elsewhere/mlflow.db",
     "no MLflow store at {cwd}/elsewhere/mlflow.db"),
]


@pytest.mark.parametrize("model,tracking,says", [c[1:] for c in PREDICT_REGISTRY_CASES],
                         ids=[c[0] for c in PREDICT_REGISTRY_CASES])
def test_predict_registry_errors_name_the_uri_and_the_store(registry, images, tmp_path, monkeypatch, capsys,
                                                            model, tracking, says):
    """One ``error:`` line (exit 2) naming the URI and the store; no mlflow.db appears anywhere."""
    from distillery.platform.errors import exit_on_user_error
    from distillery.platform.serving.predict import main

    home, store = registry
    before = snapshot(home)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    fill = {"cwd": str(work.resolve()), "store": store}
    argv = ["--model", model, "--images", str(images), "--out", str(work / "p"), "--device", "cpu"]
    if tracking:
        argv += ["--tracking-uri", tracking.format(**fill)]
    with pytest.raises(SystemExit) as code:
        exit_on_user_error(lambda: main(argv))
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: {model}") and says.format(**fill) in err[0], err
    assert len(err) == 1, err
    assert _stores(tmp_path) == [] and snapshot(home) == before and not (work / "mlruns").exists()
    assert not (work / "p" / "detections.json").exists()


# --------------------------------------------------------------------------- student.weights on the driver
def _distill_cfg(tmp_path: Path, weights: str) -> DistillConfig:
    return load_config(DistillConfig, None, [f"student.weights={weights}", f"output.local_dir={tmp_path / 'runs'}"])


def test_student_weights_from_the_registry_are_a_local_export_before_ray(registry, tmp_path):
    from distillery.platform.distill.driver import resolve_student_weights
    from distillery.students.weights import read_student_checkpoint

    _, store = registry
    cfg = resolve_student_weights(_distill_cfg(tmp_path, "models:/tiny-student@champion"), store, tmp_path / "runs")
    local = Path(cfg.student.weights)
    assert local == tmp_path / "runs" / "models" / "tiny-student-v1"
    assert {"weights.safetensors", "meta.json", "config.yaml"} <= {p.name for p in local.iterdir()}
    state, layout = read_student_checkpoint(local)  # what the workers read
    assert layout == "distillery-export" and state.keys() == _tiny_student().state_dict().keys()
    assert not [p for p in (tmp_path / "runs" / "models").iterdir() if p.name.startswith(".")]  # no partial download
    again = resolve_student_weights(_distill_cfg(tmp_path, "models:/tiny-student/1"), store, tmp_path / "runs")
    assert again.student.weights == str(local)


def _run_dir(root: Path) -> Path:
    """A run storage folder as the distillation job leaves it; checkpoint 1 has the better AP."""
    run = root / "distill-run"
    run.mkdir()
    (run / "distillery_model.json").write_text(json.dumps({"student": "rtdetrv4_tiny", "input_size": SIZE}))
    for epoch, ap in ((1, 0.3), (2, 0.2)):
        ckpt = run / f"checkpoint_{epoch:06d}"
        ckpt.mkdir()
        (ckpt / "distillery_state.pt").write_bytes(b"state")
        (ckpt / "distillery_state.json").write_text(json.dumps({"epoch": epoch, "metrics": {"AP": ap}}))
    return run


def test_student_weights_run_directory_is_its_best_checkpoint(tmp_path):
    from distillery.platform.distill.driver import resolve_student_weights

    run = _run_dir(tmp_path)
    cfg = resolve_student_weights(_distill_cfg(tmp_path, str(run)), "sqlite:///unused.db", tmp_path / "runs")
    assert cfg.student.weights == str(run / "checkpoint_000001")  # as predict --model <run dir> picks it


STUDENT_WEIGHTS_CASES = [
    # (id, student.weights relative to tmp_path, what the first line must say)
    ("missing file", "nope.pth", "student.weights={tmp}/nope.pth: no such file or directory"),
    ("a folder without weights", "empty", "student.weights={tmp}/empty: this directory is neither a run directory"),
    ("registry without a store", "models:/tiny-student@champion", "no MLflow store at {tmp}/runs/mlflow.db"),
]


@pytest.mark.parametrize("weights,says", [c[1:] for c in STUDENT_WEIGHTS_CASES], ids=[c[0] for c in STUDENT_WEIGHTS_CASES])
def test_student_weights_refused_on_the_driver(tmp_path, weights, says):
    from distillery.platform.distill.driver import resolve_student_weights
    from distillery.platform.io.weights_source import registry_tracking_uri

    (tmp_path / "empty").mkdir()
    source = weights if weights.startswith("models:/") else str(tmp_path / weights)
    store = registry_tracking_uri(None, tmp_path / "runs")
    with pytest.raises(DeterministicError) as err:
        resolve_student_weights(_distill_cfg(tmp_path, source), store, tmp_path / "runs")
    assert says.format(tmp=tmp_path) in first_line(err.value), str(err.value)
    assert _stores(tmp_path) == []


def test_registry_store_rule_is_the_jobs_and_creates_nothing(tmp_path, monkeypatch):
    from distillery.platform.io.weights_source import registry_tracking_uri, resolve_weights_source

    monkeypatch.chdir(tmp_path)
    assert registry_tracking_uri(None, "runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert registry_tracking_uri("sqlite:///x/m.db", "runs") == f"sqlite:///{tmp_path / 'x' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert registry_tracking_uri(None, "runs") == "http://127.0.0.1:9"
    assert registry_tracking_uri("sqlite:////a/b.db", "runs") == "sqlite:////a/b.db"
    assert not (tmp_path / "runs").exists()
    # A worker never looks a models:/ URI up in MLflow's default store (the old race to create one).
    with pytest.raises(ValueError, match="resolved on the driver"):
        resolve_weights_source("models:/tiny-student@champion")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- faults: one line naming the path
def _read_only(monkeypatch, directory: Path) -> None:
    """Make ``directory`` refuse new files: permission bits where they bind (not root), else (root,
    as in CI) the kernel's answer on a read-only mount, EROFS, at the probe's file creation."""
    import tempfile

    from distillery.platform.io import storage

    if os.geteuid() != 0:
        directory.chmod(0o555)
        monkeypatch.setattr(directory, "chmod", directory.chmod)  # restored below by the finalizer
        return
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == directory.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """A job that must stop before Ray starts: ray.init fails the test, whether or not an earlier
    test in this process left a Ray session up (the job is made to see none)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the job should have stopped before Ray starts")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


def _cli_error(capsys, run) -> list[str]:
    """Run a job's entry point as its command line does; return stderr's lines (exit status 2)."""
    from distillery.platform.errors import exit_on_user_error

    with pytest.raises(SystemExit) as code:
        exit_on_user_error(run)
    assert code.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("key", ["output.local_dir", "output.storage_path"])
def test_read_only_output_directory_is_refused_before_ray(tmp_path, monkeypatch, capsys, key, ray_must_not_start):
    from distillery.platform.distill.driver import run_distill

    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    paths = {"output.local_dir": tmp_path / "runs", "output.storage_path": tmp_path / "runs" / "train"}
    paths[key] = locked / "sub"
    cfg = load_config(DistillConfig, None, [f"{k}={v}" for k, v in paths.items()] +
                      [f"data.root={tmp_path / 'data'}", f"cache.uri={tmp_path / 'cache'}"])
    err = _cli_error(capsys, lambda: run_distill(cfg))
    assert err[0] == f"error: {key}={locked / 'sub'}: {locked} is not writable " \
                     f"({'Read-only file system' if os.geteuid() == 0 else 'Permission denied'}): " \
                     "choose a writable directory", err
    assert len(err) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]  # no data, cache, runs: nothing started


def test_read_only_cache_directory_is_refused_before_ray(tmp_path, monkeypatch, capsys, ray_must_not_start):
    from distillery.platform.cache.job import run_cache_job
    from distillery.platform.config.cache import CacheFeaturesConfig

    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    cfg = load_config(CacheFeaturesConfig, None, [f"cache.uri={locked / 'cache'}", f"data.root={tmp_path / 'data'}"])
    err = _cli_error(capsys, lambda: run_cache_job(cfg))
    assert err[0].startswith(f"error: cache.uri={locked / 'cache'}: {locked} is not writable"), err
    assert len(err) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


def test_an_output_path_under_a_file_is_named(tmp_path):
    from distillery.platform.io.storage import OutputNotWritableError, require_writable

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputNotWritableError) as err:
        require_writable(tmp_path / "a-file" / "runs", "output.local_dir")
    assert first_line(err.value) == f"output.local_dir={tmp_path / 'a-file' / 'runs'}: {tmp_path / 'a-file'} is a " \
                                    "file, not a directory"
    require_writable(tmp_path / "new" / "deeper", "output.local_dir")  # a folder to be created: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _writer(uri: Path):
    from distillery.platform.cache.feature_cache import FeatureCacheWriter

    return FeatureCacheWriter(uri=str(uri), fingerprint={"model": "tiny"}, grid=[4, 2, 2], dtype="fp16", shard_size=2,
                              dataset={"num_images": 4})


def test_a_full_disk_during_the_cache_build_names_the_shard_and_a_rerun_recovers(tmp_path, monkeypatch):
    """ENOSPC while a shard is written: one error naming that shard's path, no partial file (the
    temporary is removed, no manifest), and the rerun writes exactly the missing shard."""
    import numpy as np

    from distillery.platform.cache.feature_cache import FeatureCache
    from distillery.platform.io import storage

    uri = tmp_path / "cache"
    shards = [[1, 2], [3, 4]]
    grids = np.random.default_rng(0).normal(size=(2, 4, 2, 2)).astype(np.float32)
    writer = _writer(uri)
    assert writer.begin(shards) == [0, 1]
    first = writer.write_shard(0, shards[0], grids)
    real_fsync = os.fsync

    def fsync(fd):
        if "shard-00001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(storage.DiskFullError) as err:
        writer.write_shard(1, shards[1], grids)
    assert first_line(err.value).startswith(f"no space left on the device writing {uri / 'shard-00001.parquet'} (")
    assert "free some space and rerun" in first_line(err.value) and isinstance(err.value, DeterministicError)
    assert sorted(p.name for p in uri.iterdir()) == ["plan.json", "shard-00000.parquet"]  # nothing half-written

    monkeypatch.setattr(storage.os, "fsync", real_fsync)
    rerun = _writer(uri)
    assert rerun.begin(shards) == [1]  # the intact shard is kept
    rerun.finalize(2, [rerun.write_shard(1, shards[1], grids)])
    cache = FeatureCache(str(uri), expected_fingerprint={"model": "tiny"})
    cache.check_shards()
    assert first.sha256 in {s["sha256"] for s in json.loads((uri / "manifest.json").read_text())["shards"]}


def test_the_cache_build_checks_free_space_before_it_starts(tmp_path, monkeypatch):
    import collections

    from distillery.platform.cache.job import cache_split, expected_cache_bytes
    from distillery.platform.config.cache import CacheFeaturesConfig
    from distillery.platform.datasets.formats import load_split
    from distillery.platform.datasets.synthetic import generate_synthetic_coco
    from distillery.platform.io import storage

    generate_synthetic_coco(tmp_path / "data", train=6, val=1, size=64, seed=0)
    cfg = load_config(CacheFeaturesConfig, None, [f"data.root={tmp_path / 'data'}", f"cache.uri={tmp_path / 'cache'}",
                                                  "cache.shard_size=4"])
    train = load_split(cfg.data, "train")
    grid = [768, 14, 14]
    needed = expected_cache_bytes(6, grid, "fp16", 1)
    assert needed == 6 * 768 * 14 * 14 * 2 and expected_cache_bytes(6, grid, "int8", 2) == 12 * (768 * 196 + 196 * 4)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - needed + 1, needed - 1))
    with pytest.raises(storage.DiskFullError) as err:
        cache_split(cfg, "train", train, {"model": "tiny"}, grid, "float32", False)
    assert first_line(err.value) == (f"cache.uri={tmp_path / 'cache' / 'train'}: the train cache (2 shards) needs about "
                                     f"{needed / 1e6:.1f} MB, {(needed - 1) / 1e6:.1f} MB are free on {tmp_path / 'cache' / 'train'}: "
                                     "free some space or choose another cache.uri")
    assert not list((tmp_path / "cache" / "train").glob("shard-*"))  # no shard started


def test_predict_out_naming_an_existing_file_is_one_line(tmp_path, images, capsys):
    from distillery.platform.serving.predict import main

    out = tmp_path / "preds.json"
    out.write_text("keep me")
    err = _cli_error(capsys, lambda: main(["--model", str(tmp_path / "unused"), "--images", str(images),
                                           "--out", str(out)]))
    assert err == [f"error: --out {out} is an existing file, not a directory: name a directory (detections.json, "
                   "dataset.json and drawn/ are written into it)"]
    assert out.read_text() == "keep me"


# --------------------------------------------------------------------------- two jobs, one output.name
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_job_with_the_same_name_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys, ray_must_not_start):
    import socket

    from distillery.platform.distill.driver import run_distill
    from distillery.platform.engine.launch import LOCK_FILE, RunInUseError, run_lock

    run_dir = tmp_path / "train" / "same-name"
    cfg = load_config(DistillConfig, None, [f"output.local_dir={tmp_path}", f"output.storage_path={tmp_path / 'train'}",
                                            "output.name=same-name", f"data.root={tmp_path / 'data'}"])
    with run_lock(str(run_dir)) as lock:  # the first job, running
        held = json.loads(Path(lock).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        err = _cli_error(capsys, lambda: run_distill(cfg))
        assert err[0].startswith(f"error: output.name: the run directory {run_dir} is in use by another job (pid "
                                 f"{os.getpid()} on {socket.gethostname()}"), err
        assert len(err) == 1 and not (tmp_path / "data").exists()
        with pytest.raises(RunInUseError):
            with run_lock(str(run_dir)):
                pass
    assert not run_dir.exists()  # released at the end, and the folder made for it removed (nothing written)
    run_dir.mkdir(parents=True)

    # A job that died without releasing it (kill -9): its lock is stale and taken over.
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    with run_lock(str(run_dir)) as lock:
        assert json.loads(Path(lock).read_text())["pid"] == os.getpid()
    # One held on another machine cannot be checked: refused, with the owner named.
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunInUseError, match="pid 1 on elsewhere"):
        with run_lock(str(run_dir)):
            pass


# --------------------------------------------------------------------------- a worker's error: its line first
# What the driver of a distillation job on a cache with one flipped byte received from Ray's
# processes (abridged from a real run: ANSI colours, two ranks, the ingest's coordinator, Ray's
# de-duplicated repeats), around a rank 0 progress line that must still show.
WORKER_LOGS = [
    ({"pid": 23179, "actor_name": "RayTrainWorker"}, [
        "epoch 0 step 1/4 loss 41.2 (vfl 1.1, bbox 0.9, giou 1.3) lambda 1.000 3.1 img/s",
        "Error in training function:",
        "Traceback (most recent call last):",
        '  File "/site-packages/ray/data/_internal/block_batching/util.py", line 178, in __next__',
        "    return self._transform_fn(next(self._input_iter))",
        "                              ^^^^^^^^^^^^^^^^^^^^^^",
        "ray.exceptions.RayTaskError(CacheShardError): \x1b[36mray::FlatMap(image_rows_of_shard)()\x1b[39m (pid=26148)",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        '  File "/work/distillery/platform/cache/checks.py", line 104, in read_verified_shard',
        "distillery.platform.cache.checks.CacheShardError: cache shard /c/train/shard-00001.parquet does not match "
        "its checksum in /c/train/manifest.json (sha256 0763e5c6d9d4..., manifest 6c6e85e16fc6...): rerun the cache job",
        "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).",
        "To change retry attempts, backoff, or which errors are retried, configure `ray.data.DataContext`",
    ]),
    ({"pid": 25791, "actor_name": "SplitCoordinator"}, [
        'An exception was raised from a task of operator "FlatMap(image_rows_of_shard)". Dataset execution will now '
        "abort. To ignore this exception and continue, set DataContext.max_errored_blocks.",
        "Traceback (most recent call last):\x1b[32m [repeated 3x across cluster] (Ray deduplicates logs by default.)\x1b[0m",
        "    raise e\x1b[32m [repeated 8x across cluster]\x1b[0m",
    ]),
    ({"pid": 23206, "actor_name": "RayTrainWorker"}, [
        "Traceback (most recent call last):",
        "    raise self._exception",
        "StopIteration",
        "",
        "During handling of the above exception, another exception occurred:",
    ]),
    ({"pid": 8250, "actor_name": "SplitCoordinator"}, [
        "\u26a0\ufe0f  Dataset train_035Af02nRoxRsV7qUbZGi9_0 execution failed",
        "Split 1 epoch 0 get() failed after 0 rows: \x1b[36mray::FlatMap(image_rows_of_shard)()\x1b[39m (pid=9799)",
        "    for block in block_iter:",
    ]),
    ({"pid": 4549, "actor_name": "RayTrainWorker"}, [""]),
    ({"pid": 1581, "actor_name": "TrainController"}, [
        "not retrying (no retry can fix this; max_failures untouched): cache shard /c/train/shard-00001.parquet ...",
    ]),
    ({"pid": 23179, "actor_name": "RayTrainWorker"}, ["epoch 0 done: val AP 0.000"]),
]


def test_worker_tracebacks_are_held_back_and_the_error_line_comes_first(tmp_path, monkeypatch, capsys):
    from ray._private import worker as ray_worker

    from distillery.platform import errors
    from distillery.platform.cache.checks import CacheShardError

    printed: list[str] = []
    monkeypatch.setattr(ray_worker, "print_worker_logs", lambda data, *a, **k: printed.extend(data["lines"]))
    monkeypatch.setattr(errors, "_held", None)
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    path = errors.hold_worker_tracebacks(str(tmp_path))
    assert path == str(tmp_path / "logs" / "distillery-tracebacks.log")
    (tmp_path / "logs").mkdir()

    def job():
        for data, lines in WORKER_LOGS:
            ray_worker.print_worker_logs({**data, "lines": lines}, None)
        # As Ray re-raises it on the driver: Ray Data's retry advice appended to the message.
        raise CacheShardError("cache shard /c/train/shard-00001.parquet does not match its checksum in "
                              "/c/train/manifest.json: rerun the cache job\nFailed to apply UDF transform after 1/1 "
                              "attempts (total backoff 0.0s).\nTo change retry attempts, backoff, or which errors are "
                              "retried, configure it")

    err = _cli_error(capsys, job)
    assert err == ["error: cache shard /c/train/shard-00001.parquet does not match its checksum in "
                   "/c/train/manifest.json: rerun the cache job",
                   f"(the workers' tracebacks: {path}; --debug prints them)"]
    # Progress kept, every traceback held (a blank line outside one is dropped).
    assert printed == [WORKER_LOGS[0][1][0], "epoch 0 done: val AP 0.000"]
    held = Path(path).read_text().splitlines()
    assert len(held) == sum(len(lines) for _, lines in WORKER_LOGS) - 3
    assert "(RayTrainWorker pid=23179) distillery.platform.cache.checks.CacheShardError: cache shard" in "\n".join(held)

    # --debug: nothing held, and the driver's own traceback propagates.
    printed.clear()
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    monkeypatch.setattr(errors, "_held", None)
    monkeypatch.setattr(ray_worker, "print_worker_logs", lambda data, *a, **k: printed.extend(data["lines"]))
    assert errors.hold_worker_tracebacks(str(tmp_path)) is None
    with pytest.raises(CacheShardError):
        errors.exit_on_user_error(job)
    assert len(printed) == sum(len(lines) for _, lines in WORKER_LOGS)


def test_debug_flag_on_the_jobs_command_line(monkeypatch):
    from distillery.platform.config.sections import parse_job_args
    from distillery.platform.errors import DEBUG_ENV, debug_requested

    monkeypatch.setenv(DEBUG_ENV, "0")  # recorded, so that the flag's "1" is undone after the test
    parse_job_args(DistillConfig, ["train.epochs=12"])
    assert not debug_requested()
    parse_job_args(DistillConfig, ["--debug", "train.epochs=12"])
    assert debug_requested()


# --------------------------------------------------------------------------- a cluster of several nodes
@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """Two Ray nodes of 2 CPUs on this machine (``ray.cluster_utils.Cluster``: random ports, its own
    temp dir), its address; the jobs connect to it from their own process (``ray.address``). The
    "current cluster" file Ray writes for ``ray.init()`` goes to the test's folder, not /tmp/ray
    where another Ray on this machine would find it."""
    import tempfile

    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster

    folder = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    mp = pytest.MonkeyPatch()
    mp.setattr(ray_utils, "get_ray_address_file", lambda temp_dir=None: str(folder / "ray_current_cluster"))
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "temp_dir": str(folder), "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()
        mp.undo()


CLUSTER_CASES = [
    # (id, overrides, the first line)
    ("local paths on 2 nodes", [], "error: data.root={data}/images/train/"),
    ("no CPU left for the ingest", ["ray.shared_paths=true", "train.cpus_per_worker=2"],
     "error: train.cpus_per_worker=2: 2 workers x 2 CPUs hold 4 of the cluster's 4 CPUs (in all), leaving 0 for the "
     "Ray Data ingest, which needs 1 per task: lower train.cpus_per_worker or train.num_workers, or add CPUs"),
]


@pytest.mark.parametrize("overrides,says", [c[1:] for c in CLUSTER_CASES], ids=[c[0] for c in CLUSTER_CASES])
def test_a_job_that_cannot_run_on_the_cluster_says_so_at_start(two_node_cluster, tmp_path, overrides, says):
    """On a cluster of 2 nodes x 2 CPUs (the issue's, where train.cpus_per_worker=2 hung for 15
    minutes): refused at start, in the job's own process, one line naming the key."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    data = tmp_path / "data"
    argv = [sys.executable, str(root / "jobs" / "distill.py"), "--config", str(root / "configs" / "distill_tiny.yaml"),
            f"ray.address={two_node_cluster}", f"data.root={data}", f"cache.uri={tmp_path / 'cache'}",
            f"output.local_dir={tmp_path / 'runs'}", f"output.storage_path={tmp_path / 'runs' / 'train'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RAY_ADDRESS", None)
    env.pop("DISTILLERY_DEBUG", None)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors and errors[0].startswith(says.format(data=data)), proc.stderr[-3000:]
    if not overrides:
        assert "a local path, on a Ray cluster of 2 nodes whose other nodes cannot see it" in errors[0]
        assert "tracking.tracking_uri=sqlite:///" in proc.stderr  # also named, on the next line
    assert not (tmp_path / "cache").exists()  # nothing ran: no cache, no run folder (the lock's removed with it)
    assert list((tmp_path / "runs" / "train").iterdir()) == []


def test_a_worker_larger_than_every_node_is_refused(monkeypatch):
    from distillery.platform.cluster import runtime

    monkeypatch.setattr(runtime, "_max_cluster_cpus", lambda: (4.0, "in all"))
    monkeypatch.setattr(runtime, "alive_nodes", lambda: [{"Resources": {"CPU": 2.0}}, {"Resources": {"CPU": 2.0}}])
    runtime.require_ingest_cpus(1, 2)  # 2 of 4 held, a node fits it
    with pytest.raises(runtime.ClusterFitError) as err:
        runtime.require_ingest_cpus(1, 3)
    assert first_line(err.value) == ("train.cpus_per_worker=3: no node has that many CPUs (the largest has 2); Ray "
                                     "cannot place a worker")
    monkeypatch.setattr(runtime, "_max_cluster_cpus", lambda: (64.0, "at most, as its autoscaler allows"))
    runtime.require_ingest_cpus(1, 3)  # an autoscaling cluster adds the node it needs
