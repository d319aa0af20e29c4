"""Which checkpoint a job resumes from, checked on the driver before any worker starts.

A Distillery checkpoint directory (written by the training workers every epoch) holds
``distillery_state.json`` (epoch, metrics), ``distillery_state.pt`` (EMA, GAM, step), one
``rng_rank<i>.pt`` per rank and DeepSpeed's checkpoint under ``ds/``. Every ``.pt`` file is a
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

import json
import logging
import zipfile

from distillery.platform.io import storage
from distillery.platform.errors import DeterministicError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "find_latest_checkpoint", "verify_checkpoint"]

log = logging.getLogger(__name__)

# Names shared with the training loop (which writes them).
EXTRA_STATE = "distillery_state.pt"
STATE_JSON = "distillery_state.json"
DS_TAG = "ds"
# DeepSpeed's model file, present in every checkpoint whatever the ZeRO stage.
DS_MODEL_FILE = "mp_rank_00_model_states.pt"


class CheckpointError(RuntimeError, DeterministicError):
    """A checkpoint file that is missing, truncated or corrupt (names the file)."""


class CheckpointNotFoundError(FileNotFoundError, DeterministicError):
    """``resume_from`` names a path that does not exist or holds no checkpoint."""


def deepspeed_safe_globals() -> list[type]:
    """The few DeepSpeed types its checkpoints hold: the allow-list for ``torch.load(...,
    weights_only=True)`` of a DeepSpeed checkpoint file."""
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
    import torch

    try:
        safe = deepspeed_safe_globals()
    except ImportError:  # no DeepSpeed here: plain tensors and containers only
        safe = []
    with torch.serialization.safe_globals(safe):
        torch.load(fh, map_location="cpu", weights_only=True)


def _checkpoint_epoch(directory: str) -> int:
    state_uri = storage.join(directory, STATE_JSON)
    try:
        return int(json.loads(storage.read_text(state_uri))["epoch"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {state_uri} is missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {state_uri} is unreadable: {type(exc).__name__}: {exc}") from None


def verify_checkpoint(directory: str) -> int:
    """Check every file of a Distillery checkpoint directory; return its epoch, or raise
    :class:`CheckpointError` naming the first bad file."""
    epoch = _checkpoint_epoch(directory)
    _verify_torch_file(storage.join(directory, EXTRA_STATE))
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


def _checkpoints_newest_first(run_path: str) -> tuple[list[str], list[str]]:
    """(checkpoint directories under a run path, newest epoch first; the problems of those whose
    state file cannot be read), both listed newest directory first."""
    found: list[tuple[int, str]] = []
    problems: list[str] = []
    for name in sorted(storage.listdir(run_path), reverse=True):
        directory = storage.join(run_path, name)
        if not name.startswith("checkpoint_") or not storage.exists(storage.join(directory, STATE_JSON)):
            continue
        try:
            found.append((_checkpoint_epoch(directory), directory))
        except CheckpointError as exc:
            problems.append(str(exc))
    return [d for _, d in sorted(found, key=lambda e: e[0], reverse=True)], problems


def find_latest_checkpoint(path: str) -> str:
    """The checkpoint to resume from: ``path`` itself if it is a checkpoint directory, else the
    newest intact checkpoint under the run path ``path`` (corrupt newer ones are skipped with a
    warning naming the bad file). Raises :class:`CheckpointError` or :class:`CheckpointNotFoundError`."""
    if not storage.exists(path):
        raise CheckpointNotFoundError(f"resume_from: run path {path} does not exist")
    if storage.exists(storage.join(path, STATE_JSON)):  # one checkpoint, chosen by the user
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(f"resume_from: {exc}") from None
        return path
    candidates, problems = _checkpoints_newest_first(path)
    if not candidates and not problems:
        raise CheckpointNotFoundError(f"resume_from: no checkpoint with {STATE_JSON} under {path}")
    for problem in problems:
        log.warning("resume_from: skipping a corrupt checkpoint: %s", problem)
    for directory in candidates:
        try:
            verify_checkpoint(directory)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("resume_from: skipping a corrupt checkpoint: %s", exc)
            continue
        if problems:
            log.warning("resume_from: resuming from %s, the newest intact checkpoint", directory)
        return directory
    raise CheckpointError(f"resume_from: {problems[0]}; and no older intact checkpoint under {path} "
                          f"({len(problems)} checked, all corrupt)")
