"""Errors that no retry can fix, and how a job reports them to the user.

A :class:`DeterministicError` is a user error: bad data (a corrupt image, a broken annotation
file), a corrupt or mismatched feature cache, a corrupt checkpoint, an unknown model name, an
invalid configuration. Running the same thing again fails the same way, so:

- drivers check what they can before Ray Train starts and raise these errors there;
- an error of this kind raised inside a Ray Train worker stops the run at once instead of
  consuming a ``FailureConfig.max_failures`` retry (see :func:`is_deterministic` and the
  failure handling of the job launcher);
- the jobs' command line prints its message as one ``error: ...`` block (first line first, no
  traceback) and exits with status 2, as it does for configuration errors
  (:func:`exit_on_user_error`);
- the tracebacks Ray's processes print on the way (every rank's, the ingest's, the controller's)
  are held back from the console into a log file the error line names
  (:func:`hold_worker_tracebacks`); ``--debug`` on a job's command line (``DISTILLERY_DEBUG=1``)
  prints them as they come and the driver's traceback too.

Error classes join by subclassing it next to their usual base, e.g.
``class CacheError(RuntimeError, DeterministicError)``: ``except RuntimeError`` keeps working.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Callable, Iterator, TypeVar

from distillery.errors import DeterministicError, UserFacingError  # plain Python: teachers and students raise them too

__all__ = ["DEBUG_ENV", "DeterministicError", "UserFacingError", "debug_requested", "exit_on_user_error",
           "find_deterministic_error", "hold_worker_tracebacks", "is_deterministic", "user_error_message"]

T = TypeVar("T")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: Python's cause/context chain, Ray's task errors
    (``cause``) and Ray Train's worker-group and controller errors (``worker_failures``,
    ``controller_failure``), breadth first."""
    seen: set[int] = set()
    queue = [exc]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue.extend([getattr(current, "cause", None), getattr(current, "controller_failure", None),
                      current.__cause__, current.__context__])
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            queue.extend(failures.values())


def find_deterministic_error(exc: BaseException) -> DeterministicError | None:
    """The first :class:`DeterministicError` in ``exc``'s chain (itself included), or None.

    Ray re-raises a worker's exception on the driver as an instance of both its own wrapper and
    the original class; the original (its ``cause``) is preferred: its message is the user's."""
    found = [item for item in _causes(exc) if isinstance(item, DeterministicError)]
    originals = [item for item in found if not isinstance(getattr(item, "cause", None), BaseException)]
    return (originals or found or [None])[0]


def is_deterministic(exc: BaseException) -> bool:
    return find_deterministic_error(exc) is not None


def user_error_message(exc: UserFacingError) -> str:
    """The error's own message, without the text Ray prepends when it re-raises a worker's
    exception on the driver (a traceback of the remote process)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    text = _RAY_DATA_RETRY_SUFFIX.sub("", text)
    return text.strip() or type(exc).__name__


# Ray Data appends its retry advice to a failed task's exception message (two lines, on every
# error, deterministic or not): not the user's message.
_RAY_DATA_RETRY_SUFFIX = re.compile(r"\nFailed to [^\n]* after \d+/\d+ attempts \(total backoff [^\n]*\)\.(\n.*)*$")

DEBUG_ENV = "DISTILLERY_DEBUG"


def debug_requested() -> bool:
    """``--debug`` on a job's command line (or ``DISTILLERY_DEBUG=1``): tracebacks printed."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# A traceback as Ray's processes print it, one line at a time (prefix and colours stripped): its
# head, its frames and source lines (indented), the chain markers, and the exception lines.
_TRACEBACK_START = re.compile(
    r"^(Traceback \(most recent call last\):|Error in training function:|Exception in thread .*:"
    r"|An exception was raised from a task of operator|During handling of the above exception"
    r"|The above exception was the direct cause|Split \d+ epoch \d+ get\(\) failed|\W*Dataset \S+ execution failed"
    r"|not retrying \(no retry can fix this)")
_TRACEBACK_BODY = re.compile(r"^(\s|$|[A-Za-z_][\w.]*(\([\w.]+\))?(:\s|:?$)|Failed to .* after \d+/\d+ attempts"
                             r"|To change retry attempts)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DEDUP_SUFFIX = re.compile(r"\s*\[repeated \d+x across cluster\].*$")


class _HeldTracebacks:
    """Worker log lines that are part of a traceback, kept out of the console (see
    :func:`hold_worker_tracebacks`): per process, a traceback (or Ray's report of a failed task
    or dataset) runs from its head to the first line that is not part of one."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._open: set[str] = set()  # the processes inside a traceback now

    def keep(self, data: dict, line: str) -> bool:
        """True: print ``line``; False: it went to the log file."""
        plain = _DEDUP_SUFFIX.sub("", _ANSI.sub("", line))
        source = f"{data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')}"
        if not plain.strip() and source not in self._open:
            return False  # a blank line (Ray Train prints one before a rank's error report): nothing to show
        if _TRACEBACK_START.match(plain) or (source in self._open and _TRACEBACK_BODY.match(plain)):
            self._open.add(source)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"({source}) {plain}\n")
            self.count += 1
            return False
        self._open.discard(source)
        return True


_held: _HeldTracebacks | None = None


def hold_worker_tracebacks(session_dir: str | None = None) -> str | None:
    """Keep the tracebacks Ray's processes print (every rank's, the ingest's, the controller's)
    off this driver's console, into ``<session_dir>/logs/distillery-tracebacks.log`` (Ray's
    session folder of the job, kept after it ends), so that a failed job's ``error:`` line comes
    first and alone; the line then names that file. Nothing held with ``--debug``. Returns the
    file's path (None when nothing is held). Wraps Ray's ``print_worker_logs`` once per process
    (Ray has no public filter for it, as ``engine.progress.filter_ray_log_noise`` says)."""
    global _held
    if debug_requested():
        return None
    try:
        from ray._private import worker as ray_worker  # here: errors.py stays importable without Ray
    except ImportError:  # pragma: no cover - another Ray layout: nothing held
        return None
    folder = os.path.join(session_dir, "logs") if session_dir else tempfile.gettempdir()
    path = os.path.join(folder, "distillery-tracebacks.log")
    if _held is not None and getattr(ray_worker.print_worker_logs, "holds_tracebacks", False):
        _held.path = path
        return path
    _held = holder = _HeldTracebacks(path)
    original = ray_worker.print_worker_logs

    def print_worker_logs(data, *args, **kwargs):
        kept = [line for line in data.get("lines", []) if holder.keep(data, line)]
        if kept:
            original({**data, "lines": kept}, *args, **kwargs)

    print_worker_logs.holds_tracebacks = True
    ray_worker.print_worker_logs = print_worker_logs
    return path


def _find_user_facing(exc: BaseException) -> UserFacingError | None:
    found = find_deterministic_error(exc)
    if found is not None:
        return found
    return next((item for item in _causes(exc) if isinstance(item, UserFacingError)), None)


def exit_on_user_error(run: Callable[[], T]) -> T:
    """Call ``run()``; if it fails with a :class:`UserFacingError` (a deterministic error first,
    anywhere in the chain, e.g. raised in a Ray worker), print ``error: <message>`` to stderr and
    exit with status 2 (naming the file that holds the workers' tracebacks, if they printed any).
    Any other exception propagates with its traceback (a bug), as does any with ``--debug``."""
    held_before = _held.count if _held is not None else 0
    try:
        return run()
    except Exception as exc:
        found = _find_user_facing(exc)
        if found is None or debug_requested():
            raise
        sys.stderr.write(f"error: {user_error_message(found)}\n")
        if _held is not None and _held.count > held_before:  # this job's workers printed tracebacks
            sys.stderr.write(f"(the workers' tracebacks: {_held.path}; --debug prints them)\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
