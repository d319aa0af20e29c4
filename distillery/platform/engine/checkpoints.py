"""Every file of a training checkpoint, written and read here; and which checkpoint a job resumes
from, checked on the driver before any worker starts.

A Distillery checkpoint directory (written by the training engine every epoch, every job) holds
``distillery_state.json`` (:class:`CheckpointRecord`: the job's kind, epoch, metrics, rank checks
and the job's own record: its spec's ``record_class``), ``distillery_state.pt``
(:class:`EngineState`: epoch, step and the state of each named component the job has, such as
``ema``), one ``rng_rank<i>.pt`` per rank and DeepSpeed's checkpoint under ``ds/``; a job adds
its own files beside them (its ``write_files`` hook). Every ``.pt`` file is a
zip archive (``torch.save``; DeepSpeed's files too, with the training loop's checkpoint engine)
whose members carry a CRC-32: reading each member back verifies a file end to end without
unpickling anything, so a truncated or overwritten file is found here, in seconds, instead of in
the workers after a group restart. (A file in torch's legacy format, DeepSpeed's default, gets a
restricted ``weights_only`` load instead.)

``output.resume_from`` may name a run (the newest intact checkpoint under it is used; corrupt
newer ones are skipped with a warning naming the bad file) or one checkpoint directory (used
as given, or refused naming the bad file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, TypeVar

import numpy as np
import torch

from distillery.platform.io import storage
from distillery.platform.errors import DeterministicError

if TYPE_CHECKING:
    from distillery.platform.engine.spec import JobSpec

__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointRecord", "EngineState", "best_checkpoint",
           "best_run_checkpoint",
           "find_latest_checkpoint", "load_engine_state", "read_record", "save_checkpoint_files",
           "verify_checkpoint"]

log = logging.getLogger(__name__)

# The engine's file names of a checkpoint directory (one meaning each, in every job).
ENGINE_STATE = "distillery_state.pt"      # EngineState: epoch, step, named components (torch.save)
STATE_JSON = "distillery_state.json"      # CheckpointRecord: kind, epoch, metrics, rank checks, job record
DS_TAG = "ds"                             # DeepSpeed's checkpoint (its tag: a sub-directory)
DS_MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's model file, whatever the ZeRO stage
# A file of a run's storage (beside its checkpoint_* directories).
FAULT_MARKER = "fault_injected"           # debug.kill: the worker was killed once (+ "_<phase>" for a named phase)


def rng_file(rank: int) -> str:
    """The file of one rank's RNG states."""
    return f"rng_rank{rank}.pt"


class CheckpointError(RuntimeError, DeterministicError):
    """A checkpoint file that is missing, truncated or corrupt (names the file)."""


class CheckpointNotFoundError(FileNotFoundError, DeterministicError):
    """``resume_from`` names a path that does not exist or holds no checkpoint."""


def deepspeed_safe_globals() -> list[type]:
    """The few DeepSpeed types its checkpoints hold: the allow-list for ``torch.load(...,
    weights_only=True)`` of a DeepSpeed checkpoint file."""
    # Imported here: the driver checks checkpoints without loading DeepSpeed (seconds of imports)
    # unless it meets a legacy-format file.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    safe: list[type] = [LossScaler, DynamicLossScaler, fragment_address]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        safe.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover - older layouts
        pass
    return safe


def _verify_torch_file(uri: str) -> None:
    """Read a ``torch.save`` file back: a zip archive (torch's format, and DeepSpeed's with our
    checkpoint engine) member by member against its CRC-32s; a legacy-format file (DeepSpeed's
    default, written by older runs) by a restricted ``weights_only`` load."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                fh.seek(0)
                with zipfile.ZipFile(fh) as archive:
                    bad = archive.testzip()
            else:
                fh.seek(0)
                _load_legacy(fh)
                bad = None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {uri} is missing") from None
    except Exception as exc:  # a truncated archive, garbage, a pickle outside the allow-list
        raise CheckpointError(f"checkpoint file {uri} is truncated or corrupt "
                              f"(not a complete torch.save file: {type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint file {uri} is corrupt (member {bad} fails its CRC check)")


def _load_legacy(fh) -> None:
    try:
        safe = deepspeed_safe_globals()
    except ImportError:  # no DeepSpeed here: plain tensors and containers only
        safe = []
    with torch.serialization.safe_globals(safe):
        torch.load(fh, map_location="cpu", weights_only=True)


def verify_checkpoint(directory: str, spec: JobSpec | None = None) -> int:
    """Check every file of a Distillery checkpoint directory (written by ``spec``'s job, when
    given); return its epoch, or raise :class:`CheckpointError` naming the first bad file."""
    epoch = int(read_record(directory, spec).epoch)
    _verify_torch_file(storage.join(directory, ENGINE_STATE))
    ds_dir = storage.join(directory, DS_TAG)
    ds_files = [n for n in storage.listdir(ds_dir) if n.endswith(".pt")]
    if DS_MODEL_FILE not in ds_files:
        raise CheckpointError(f"checkpoint {directory} has no DeepSpeed checkpoint "
                              f"({storage.join(ds_dir, DS_MODEL_FILE)} is missing)")
    for name in ds_files:
        _verify_torch_file(storage.join(ds_dir, name))
    for name in storage.listdir(directory):
        if name.startswith("rng_rank") and name.endswith(".pt"):
            _verify_torch_file(storage.join(directory, name))
    return epoch


T = TypeVar("T")


def best_checkpoint(candidates: Iterable[tuple[T, Mapping[str, Any] | None]], metric: str = "AP") -> T | None:
    """The "best" checkpoint, one rule for the job's summary, the registry and predict: of
    ``(checkpoint, metrics)`` pairs, the one with the highest finite val ``metric`` (a job's spec's
    ``best_metric``); of equal values the first given (pass them in report order: Ray Train lists
    equal scores that way); None when no metrics hold a finite value (the caller then takes the
    latest checkpoint)."""
    best, best_value = None, -float("inf")
    for checkpoint, metrics in candidates:
        value = (metrics or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > best_value:
            best, best_value = checkpoint, float(value)
    return best


def best_run_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of a (local) run directory the job's summary and the registry call best
    (:func:`best_checkpoint`: the highest val AP, the earliest epoch of equal ones); the latest
    when none has an AP. ``predict --model <run dir>`` and ``student.weights=<run dir>`` use it."""
    checkpoints = [p for p in run_dir.glob("checkpoint_*") if (p / ENGINE_STATE).is_file()]
    if not checkpoints:
        raise FileNotFoundError(f"run directory {run_dir} has no checkpoint_*/distillery_state.pt")

    def record(path: Path) -> dict[str, Any]:
        try:
            data = json.loads((path / STATE_JSON).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    records = {p: record(p) for p in checkpoints}

    def order(path: Path) -> tuple[int, int, str]:
        phase, epoch = records[path].get("phase_index", 0), records[path].get("epoch")
        return (phase if isinstance(phase, int) else 0), (epoch if isinstance(epoch, int) else -1), path.name

    in_report_order = sorted(checkpoints, key=order)
    best = best_checkpoint((p, records[p].get("metrics")) for p in in_report_order)
    return best if best is not None else in_report_order[-1]


def _checkpoints_newest_first(run_path: str, spec: JobSpec | None) -> tuple[list[str], list[str]]:
    """(checkpoint directories under a run path, newest (phase, epoch) first; the problems of those
    whose state file cannot be read), both listed newest directory first."""
    found: list[tuple[tuple[int, int], str]] = []
    problems: list[str] = []
    for name in sorted(storage.listdir(run_path), reverse=True):
        directory = storage.join(run_path, name)
        if not name.startswith("checkpoint_") or not storage.exists(storage.join(directory, STATE_JSON)):
            continue
        try:
            found.append((read_record(directory, spec).order(), directory))
        except CheckpointError as exc:
            problems.append(str(exc))
    return [d for _, d in sorted(found, key=lambda e: e[0], reverse=True)], problems


def find_latest_checkpoint(path: str, spec: JobSpec | None = None) -> str:
    """The checkpoint to resume from: ``path`` itself if it is a checkpoint directory, else the
    newest intact checkpoint under the run path ``path`` (corrupt newer ones are skipped with a
    warning naming the bad file); with ``spec``, one written by that job. Raises
    :class:`CheckpointError` or :class:`CheckpointNotFoundError`."""
    if not storage.exists(path):
        raise CheckpointNotFoundError(f"resume_from: run path {path} does not exist")
    if storage.exists(storage.join(path, STATE_JSON)):  # one checkpoint, chosen by the user
        try:
            verify_checkpoint(path, spec)
        except CheckpointError as exc:
            raise CheckpointError(f"resume_from: {exc}") from None
        return path
    candidates, problems = _checkpoints_newest_first(path, spec)
    if not candidates and not problems:
        raise CheckpointNotFoundError(f"resume_from: no checkpoint with {STATE_JSON} under {path}")
    for problem in problems:
        log.warning("resume_from: skipping a corrupt checkpoint: %s", problem)
    for directory in candidates:
        try:
            verify_checkpoint(directory, spec)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("resume_from: skipping a corrupt checkpoint: %s", exc)
            continue
        if problems:
            log.warning("resume_from: resuming from %s, the newest intact checkpoint", directory)
        return directory
    raise CheckpointError(f"resume_from: {problems[0]}; and no older intact checkpoint under {path} "
                          f"({len(problems)} checked, all corrupt)")


# --------------------------------------------------------------------------- the typed state

@dataclass
class EngineState:
    """What the engine restores besides DeepSpeed's own files (``distillery_state.pt``, rank 0):
    the epoch, the step and each named stateful component's ``state_dict()`` (``ema``, and what
    the job adds, such as distillation's ``gam``), at the file's top level under its name."""

    epoch: int
    global_step: int = 0
    components: dict[str, Any] = field(default_factory=dict)

    def to_file(self) -> dict[str, Any]:
        reserved = {"epoch", "global_step"} & set(self.components)
        if reserved:
            raise ValueError(f"a stateful component may not be named {sorted(reserved)}")
        return {"epoch": self.epoch, "global_step": self.global_step, **self.components}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineState":
        return cls(int(data["epoch"]), int(data["global_step"]),
                   {k: v for k, v in data.items() if k not in ("epoch", "global_step") and v is not None})


@dataclass
class CheckpointRecord:
    """``distillery_state.json``: what a checkpoint is (epoch, metrics, rank checks); a job's spec
    names the subclass holding its own record. The file also carries the job's kind."""

    epoch: int                       # within its phase, as global_step
    global_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, list] = field(default_factory=dict)
    phase: str | None = None         # the job phase that wrote it (None: written before phases)
    phase_index: int = 0             # its place among the job's phases: checkpoints order by (phase_index, epoch)

    def order(self) -> tuple[int, int]:
        return self.phase_index, self.epoch

    def to_json(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CheckpointRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_record(directory: str | Path, spec: JobSpec | None = None) -> CheckpointRecord:
    """The record of a checkpoint directory (local or remote): the engine's fields, or with
    ``spec`` its job's record class, refusing a checkpoint another job wrote. (Records written
    before they named their kind are read as ``spec``'s.)"""
    uri = storage.join(str(directory), STATE_JSON)
    try:
        data = json.loads(storage.read_text(uri))
        kind = data.get("kind")
        if spec is None:
            return CheckpointRecord.from_json(data)
        if kind is not None and kind != spec.name:
            raise CheckpointError(f"checkpoint {directory} was written by the {kind} job, not by {spec.name} "
                                  f"({uri}): resume a {spec.name} run from its own checkpoints")
        return spec.record_class.from_json(data)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {uri} is missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint file {uri} is unreadable: {type(exc).__name__}: {exc}") from None


def rng_state() -> dict[str, Any]:
    """This process's torch, Python and NumPy RNG states (tensors and lists: weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))


def save_checkpoint_files(directory: str | Path, rank: int, state: EngineState, record: CheckpointRecord,
                          kind: str) -> None:
    """The engine's files of a checkpoint: this rank's RNG states; on rank 0 the engine state and
    the record of the job ``kind``. (DeepSpeed's files and the job's own files are written beside them.)"""
    directory = Path(directory)
    torch.save(rng_state(), directory / rng_file(rank))
    if rank == 0:
        torch.save(state.to_file(), directory / ENGINE_STATE)
        (directory / STATE_JSON).write_text(json.dumps(record.to_json(kind), default=float))


def load_engine_state(directory: str | Path, rank: int) -> tuple[EngineState, dict[str, Any] | None]:
    """(engine state written by rank 0, this rank's RNG states or None) from a checkpoint dir."""
    directory = Path(directory)
    state_path = directory / ENGINE_STATE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {ENGINE_STATE}: not a Distillery checkpoint, "
                              "or it was truncated")
    rng_path = directory / rng_file(rank)
    return (EngineState.from_dict(_load_state_file(state_path)),
            _load_state_file(rng_path) if rng_path.is_file() else None)


def _load_state_file(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, garbage, a pickle outside the allow-list
        raise CheckpointError(f"checkpoint file {path} cannot be loaded (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None


def safe_checkpoint_engine():
    """DeepSpeed's checkpoint engine with ``torch.load(weights_only=True)``.

    DeepSpeed loads its own checkpoint files with full unpickling; ours come from storage, so
    they are loaded with the restricted unpickler and an explicit allow-list of the few
    DeepSpeed/torch types its checkpoints hold.
    """
    # Imported here: the driver uses this module without loading DeepSpeed.
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__()
            # Zip archives (DeepSpeed's default is torch's legacy format): every record carries a
            # CRC-32, so the driver verifies a checkpoint end to end before resuming from it.
            self.zipfile_serialization = True

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except FileNotFoundError:
                    raise CheckpointError(f"checkpoint file {path} is missing") from None
                except Exception as exc:
                    raise CheckpointError(f"checkpoint file {path} cannot be loaded (truncated or corrupt?): "
                                          f"{type(exc).__name__}: {exc}") from None

    return SafeTorchCheckpointEngine()
