"""Bad input on the training side, table-driven: configuration, checkpoints to resume, Ray Train's
retry decision, the model registry, the served predictor, the tracking store's artifact place.

Every case asserts the FIRST LINE of the error names the file or field (a user reads that line
and nothing else), and that nothing was lost or half-written (the files the case points at are
byte-for-byte as before). No case starts Ray: each calls the function the job calls."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.platform.engine.checkpoints import CheckpointError, find_latest_checkpoint, verify_checkpoint
from distillery.platform.config.sections import ConfigError, load_config
from distillery.platform.config.distill import DistillConfig
from distillery.platform.errors import DeterministicError, is_deterministic

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _mlflow_globals_restored(monkeypatch):
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ: keep it from leaking
    into later tests (a job without tracking.tracking_uri would log there)."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: the "nothing was lost or half-written" check."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- configuration
CONFIG_CASES = [
    # (id, overrides, what the first line must name, what the message must also say)
    ("unknown key", ["train.epoch=3"], "train.epoch", "unknown key"),
    ("wrong type", ["train.epochs=many"], "train.epochs", "integer"),
    ("unknown student", ["student.name=rtdetrv9_huge"], "student.name", "deimv2_s"),
    ("unknown student lists rtdetrv4", ["student.name=rtdetrv9_huge"], "student.name", "rtdetrv4_s"),
    ("gam band", ["gam.rho=0.2", "gam.delta=0.3"], "gam", "must be smaller than gam.rho"),
    ("teacher and student sizes", ["teacher.input_size=320"], "teacher.input_size", "must equal student.input_size"),
    ("schedule longer than run", ["train.epochs=2"], "train.epochs", "optim.no_aug_epochs"),
    ("peft on a CNN", ["student.peft.method=lora"], "student.peft.method", "needs a ViT backbone"),
    ("progress every 0 steps", ["train.progress_every=0"], "train.progress_every", "greater than 0"),
    ("preview too large", ["tracking.augment_preview=100"], "tracking.augment_preview", "less than or equal"),
    ("bad zero stage", ["deepspeed.zero_stage=3"], "deepspeed.zero_stage", "zero_stage"),
]


@pytest.mark.parametrize("overrides,names,says", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_name_the_key(overrides, names, says):
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, None, overrides)
    assert names in first_line(err.value), str(err.value)
    assert says in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, missing)
    assert str(missing) in first_line(err.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, broken)
    assert str(broken) in first_line(err.value)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student: {name: rtdetrv9_huge}\n")
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, recipe)
    assert str(recipe) in first_line(err.value) and "rtdetrv9_huge" in str(err.value)


def test_every_valid_student_name_passes_validation():
    from distillery.platform.config.distill import known_student_names

    names = known_student_names()
    assert any(n.startswith("deimv2_") for n in names) and "rtdetrv4_s" in names
    for name in names:
        assert DistillConfig.model_validate({"student": {"name": name}}).student.name == name


# --------------------------------------------------------------------------- checkpoints
def make_checkpoint(run: Path, index: int, epoch: int) -> Path:
    """A checkpoint directory laid out as the training loop writes it (tiny tensors)."""
    ckpt = run / f"checkpoint_{index:06d}"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "distillery_state.json").write_text(json.dumps({"epoch": epoch, "global_step": 4 * (epoch + 1),
                                                            "metrics": {"AP": 0.1 * epoch}}))
    torch.save({"ema": {"module": {"w": torch.ones(3)}}, "gam": None, "epoch": epoch, "global_step": 4},
               ckpt / "distillery_state.pt")
    # DeepSpeed's model file in torch's legacy (non-zip) format, as DeepSpeed writes by default;
    # the others are zip archives (torch.save's default, and our DeepSpeed checkpoint engine's).
    torch.save({"module": {"w": torch.full((64,), float(epoch))}}, ckpt / "ds" / "mp_rank_00_model_states.pt",
               _use_new_zipfile_serialization=False)
    torch.save({"optimizer_state_dict": {"state": torch.zeros(64)}}, ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    for rank in range(2):
        torch.save({"torch": torch.get_rng_state()}, ckpt / f"rng_rank{rank}.pt")
    return ckpt


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 32)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "train" / "run"
    make_checkpoint(run, 0, epoch=0)
    make_checkpoint(run, 1, epoch=1)
    return run


def test_intact_run_resumes_from_the_newest(run_dir):
    assert find_latest_checkpoint(str(run_dir)).endswith("checkpoint_000001")
    assert verify_checkpoint(str(run_dir / "checkpoint_000000")) == 0


# (id, file to damage in the newest checkpoint, damage)
FALLBACK_CASES = [
    ("truncated DeepSpeed model file (legacy format)", "ds/mp_rank_00_model_states.pt", truncate),
    ("garbage DeepSpeed model file (legacy format)", "ds/mp_rank_00_model_states.pt", garble),
    ("garbage DeepSpeed optimizer file", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", garble),
    ("truncated distillery_state.pt", "distillery_state.pt", truncate),
    ("truncated rank RNG state", "rng_rank1.pt", truncate),
    ("unreadable distillery_state.json", "distillery_state.json", lambda p: p.write_text("{\"epo")),
    ("deleted DeepSpeed model file", "ds/mp_rank_00_model_states.pt", lambda p: p.unlink()),
]


@pytest.mark.parametrize("relative,damage", [c[1:] for c in FALLBACK_CASES], ids=[c[0] for c in FALLBACK_CASES])
def test_corrupt_newest_checkpoint_falls_back_to_the_intact_one(run_dir, relative, damage, caplog):
    damage(run_dir / "checkpoint_000001" / relative)
    before = snapshot(run_dir)
    with caplog.at_level(logging.WARNING, logger="distillery.platform.engine.checkpoints"):
        chosen = find_latest_checkpoint(str(run_dir))
    assert chosen.endswith("checkpoint_000000")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(run_dir / "checkpoint_000001" / relative) in w for w in warned), warned
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("relative,damage", [c[1:] for c in FALLBACK_CASES], ids=[c[0] for c in FALLBACK_CASES])
def test_no_intact_checkpoint_fails_on_the_driver_naming_the_file(run_dir, relative, damage):
    for index in (0, 1):
        damage(run_dir / f"checkpoint_{index:06d}" / relative)
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as err:
        find_latest_checkpoint(str(run_dir))
    line = first_line(err.value)
    assert line.startswith("resume_from: ") and str(run_dir / "checkpoint_000001" / relative) in line, line
    assert is_deterministic(err.value)
    assert snapshot(run_dir) == before


def test_a_chosen_checkpoint_directory_is_used_as_given_or_refused(run_dir):
    chosen = run_dir / "checkpoint_000000"
    assert find_latest_checkpoint(str(chosen)) == str(chosen)
    truncate(chosen / "distillery_state.pt")
    with pytest.raises(CheckpointError) as err:
        find_latest_checkpoint(str(chosen))  # no fallback: the user named this one
    assert str(chosen / "distillery_state.pt") in first_line(err.value)


def test_bad_resume_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_latest_checkpoint(str(tmp_path / "nope"))
    assert first_line(err.value) == f"resume_from: run path {tmp_path / 'nope'} does not exist"
    assert is_deterministic(err.value)  # jobs print it as one "error: ..." line, exit status 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        find_latest_checkpoint(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in first_line(err.value)


def test_worker_side_state_load_names_the_file(run_dir):
    from distillery.platform.engine.checkpoints import load_engine_state

    ckpt = run_dir / "checkpoint_000001"
    state, rng = load_engine_state(ckpt, rank=1)
    assert state.epoch == 1 and "torch" in rng
    truncate(ckpt / "distillery_state.pt")
    with pytest.raises(CheckpointError) as err:
        load_engine_state(ckpt, rank=0)
    assert str(ckpt / "distillery_state.pt") in first_line(err.value)
    (ckpt / "distillery_state.pt").unlink()
    with pytest.raises(CheckpointError, match="has no distillery_state.pt"):
        load_engine_state(ckpt, rank=0)


# --------------------------------------------------------------------------- retries
def _worker_group_error(exc: Exception):
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("rank 1 failed", {1: exc})


def test_deterministic_worker_errors_are_not_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    from distillery.platform.engine.failure_policy import create_failure_policy

    policy = create_failure_policy(FailureConfig(max_failures=3))
    corrupt = CheckpointError("checkpoint file /x/ds/mp_rank_00_model_states.pt cannot be loaded")
    assert policy.make_decision(_worker_group_error(corrupt)) == FailureDecision.RAISE
    # A worker that died for another reason is retried, and only that counts against max_failures.
    for _ in range(3):
        assert policy.make_decision(_worker_group_error(RuntimeError("worker killed"))) == FailureDecision.RETRY
    assert policy.make_decision(_worker_group_error(RuntimeError("worker killed"))) == FailureDecision.RAISE


def test_checkpoint_errors_are_deterministic():
    assert issubclass(CheckpointError, DeterministicError) and issubclass(CheckpointError, RuntimeError)
    assert is_deterministic(_worker_group_error(CheckpointError("checkpoint file x is missing")))
    assert not is_deterministic(_worker_group_error(RuntimeError("worker killed")))


# --------------------------------------------------------------------------- registry
@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_registry_errors_name_model_run_and_alias(sqlite_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from distillery.platform.tracking.registry import RegistryError, load_champion, promote_run, rollback
    from distillery.platform.tracking.runs import create_run

    with pytest.raises(RegistryError) as err:
        load_champion(sqlite_uri, "no-such-model")
    assert first_line(err.value) == "registered model 'no-such-model' does not exist"
    MlflowClient(sqlite_uri, registry_uri=sqlite_uri).create_registered_model("detector")
    with pytest.raises(RegistryError) as err:
        load_champion(sqlite_uri, "detector", alias="staging")
    assert first_line(err.value) == "registered model 'detector' has no alias 'staging'"
    with pytest.raises(RegistryError) as err:
        rollback(sqlite_uri, "detector")
    assert "'detector'" in first_line(err.value) and "'champion'" in first_line(err.value)
    with pytest.raises(RegistryError) as err:
        promote_run(sqlite_uri, "detector", "0123456789abcdef0123456789abcdef")
    assert "run '0123456789abcdef0123456789abcdef' not found" in first_line(err.value)
    run_id = create_run(sqlite_uri, "exp", "no-model", {})
    with pytest.raises(RegistryError) as err:
        promote_run(sqlite_uri, "detector", run_id)
    assert first_line(err.value).startswith(f"run {run_id} has no logged model")


def test_unreachable_tracking_server_is_named():
    from distillery.platform.tracking.runs import tracking_reachable

    with pytest.raises(ConnectionError) as err:
        tracking_reachable("http://127.0.0.1:9", timeout=2)
    assert first_line(err.value).startswith("MLflow tracking server http://127.0.0.1:9 is not reachable")


# --------------------------------------------------------------------------- artifacts follow the store
def test_sqlite_stores_keep_their_artifacts_beside_them(tmp_path, monkeypatch):
    """Two sqlite stores used from one directory: each one's artifacts under its own folder,
    nothing in the working directory's ./mlruns."""
    import mlflow

    from distillery.platform.tracking.runs import create_run

    monkeypatch.chdir(tmp_path)
    uris = [f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "sqlite:///b/store.db"]  # absolute and relative
    for uri in uris:
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    roots = []
    for uri in uris:
        run_id = create_run(uri, "distillery", "r", {"x": "1"})
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_text("hello", "note.txt")
        roots.append(mlflow.get_run(run_id).info.artifact_uri)
    assert roots[0].startswith((tmp_path / "a" / "mlflow-artifacts" / "distillery").as_uri())
    assert roots[1].startswith((tmp_path / "b" / "store-artifacts" / "distillery").as_uri())
    assert (tmp_path / "a" / "mlflow-artifacts").is_dir() and (tmp_path / "b" / "store-artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_relative_sqlite_tracking_uri_is_made_absolute(tmp_path, monkeypatch):
    """Workers run in other directories: a relative sqlite path must not reach them as given."""
    from distillery.platform.tracking.runs import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db", "ignored") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert resolve_tracking_uri(None, "ignored") == f"sqlite:///{tmp_path / 'other.db'}"
    assert resolve_tracking_uri("http://mlflow:5000", "ignored") == "http://mlflow:5000"


# --------------------------------------------------------------------------- the served predictor
class _TinyDetector(torch.nn.Module):
    """The exported detector's interface (images -> scores, labels, boxes), a few bytes of ONNX."""

    def __init__(self):
        super().__init__()
        self.register_buffer("labels", torch.tensor([[1, 0]], dtype=torch.int64))
        self.register_buffer("boxes", torch.tensor([[[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 8.0, 8.0]]]))

    def forward(self, images):
        b = images.shape[0]
        brightness = images.mean(dim=(1, 2, 3))
        scores = torch.stack([brightness, brightness * 0.5], 1)
        return scores, self.labels.expand(b, 2), self.boxes.expand(b, 2, 4) + scores[..., None]


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """The pyfunc model as the job logs it (predictor code + ONNX + meta), in a sqlite store."""
    import mlflow

    from distillery.platform.serving.export import log_pyfunc_model
    from distillery.platform.tracking.runs import create_run

    tmp = tmp_path_factory.mktemp("served")
    onnx_path, meta_path = tmp / "model.onnx", tmp / "meta.json"
    torch.onnx.export(_TinyDetector(), (torch.rand(1, 3, 32, 32),), str(onnx_path), input_names=["images"],
                      output_names=["scores", "labels", "boxes"],
                      dynamic_axes={n: {0: "batch"} for n in ("images", "scores", "labels", "boxes")},
                      opset_version=17, dynamo=False)
    meta_path.write_text(json.dumps({"input_size": 32, "category_ids": [3, 7], "category_names": ["cat", "dog"]}))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_id = create_run(uri, "serving", "r", {})
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        model_uri = log_pyfunc_model(onnx_path, meta_path)
    return mlflow.pyfunc.load_model(model_uri)


def test_predictions_carry_ids_and_names(served_model):
    out = served_model.predict(np.full((2, 40, 30, 3), 128, dtype=np.uint8))
    assert out["labels"].tolist() == [[7, 3], [7, 3]]
    assert out["names"].tolist() == [["dog", "cat"], ["dog", "cat"]]
    assert out["boxes"].shape == (2, 2, 4)
    assert out["boxes"][0, 0, 2] == pytest.approx((20.0 + out["scores"][0, 0]) * 30 / 32, rel=1e-5)


PREDICT_CASES = [
    # (id, input, what the first line must say)
    ("float image in [0, 1]", np.random.default_rng(0).random((40, 30, 3)), "floating-point pixels"),
    ("float32 batch", np.ones((2, 40, 30, 3), dtype=np.float32), "dtype float32"),
    ("grey image", np.zeros((40, 30), dtype=np.uint8), "shape (40, 30)"),
    ("RGBA batch", np.zeros((1, 40, 30, 4), dtype=np.uint8), "shape (1, 40, 30, 4)"),
    ("channels first", np.zeros((3, 40, 30), dtype=np.uint8), "shape (3, 40, 30)"),
    ("values past 255", np.full((8, 8, 3), 300, dtype=np.int64), "[300, 300]"),
    ("strings", np.full((8, 8, 3), "x"), "dtype <U1"),
]


@pytest.mark.parametrize("image,says", [c[1:] for c in PREDICT_CASES], ids=[c[0] for c in PREDICT_CASES])
def test_bad_images_are_refused_with_the_reason_first(served_model, image, says):
    with pytest.raises(Exception) as err:
        served_model.predict(image)
    line = first_line(err.value)
    assert line.startswith("image input has") and says in line, line
    assert len(line) < 300  # the reason, not the pixels


def test_served_json_requests(served_model):
    """What `mlflow models serve` answers: integers from JSON work; floats and wrong shapes get
    HTTP 400 whose message is the reason (no dump of the request)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    def post(array) -> tuple[int, dict]:
        body = json.dumps({"inputs": np.asarray(array).tolist()})
        try:
            reply = scoring_server.invocations(body, "application/json", served_model,
                                               served_model.metadata.get_input_schema())
        except MlflowException as exc:
            return exc.get_http_status_code(), json.loads(exc.serialize_as_json())
        return reply.status, json.loads(reply.response)

    status, body = post(np.full((16, 16, 3), 200))
    assert status == 200 and body["predictions"]["names"] == [["dog", "cat"]]
    status, body = post(np.random.default_rng(1).random((16, 16, 3)))
    assert status == 400 and body["message"].startswith("image input has floating-point pixels"), body
    status, body = post(np.zeros((16, 16)))
    assert status == 400 and body["message"].startswith("image input has shape (16, 16)"), body


# --------------------------------------------------------------------------- the command line
CLI_CASES = [
    # (id, overrides given a fresh tmp dir and a run with a corrupt newest-and-only checkpoint, first line)
    ("corrupt checkpoint to resume", lambda run: [f"output.resume_from={run}"],
     lambda run: f"error: resume_from: checkpoint file {run / 'checkpoint_000000' / 'distillery_state.pt'} is truncated"),
    ("resume path missing", lambda run: [f"output.resume_from={run / 'nope'}"],
     lambda run: f"error: resume_from: run path {run / 'nope'} does not exist"),
    ("unknown student", lambda run: ["student.name=rtdetrv9_huge"],
     lambda run: "error: invalid configuration (embedded default + overrides student.name=rtdetrv9_huge "),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_distill_job_prints_one_error_line_before_ray_starts(tmp_path, overrides, expected):
    import subprocess
    import sys

    run = tmp_path / "train" / "run"
    truncate(make_checkpoint(run, 0, epoch=0) / "distillery_state.pt")
    before = snapshot(tmp_path)
    args = [*overrides(run), f"output.local_dir={tmp_path / 'local'}", f"data.root={tmp_path / 'data'}",
            f"output.storage_path={tmp_path / 'train'}"]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "distill.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and lines[0].startswith(expected(run)), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr
    assert snapshot(tmp_path) == before  # no dataset generated, nothing written
