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
  (:func:`exit_on_user_error`).

Error classes join by subclassing it next to their usual base, e.g.
``class CacheError(RuntimeError, DeterministicError)``: ``except RuntimeError`` keeps working.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, TypeVar

from distillery.errors import DeterministicError, UserFacingError  # plain Python: teachers and students raise them too

__all__ = ["DeterministicError", "UserFacingError", "exit_on_user_error", "find_deterministic_error",
           "is_deterministic", "user_error_message"]

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
    return text.strip() or type(exc).__name__


def _find_user_facing(exc: BaseException) -> UserFacingError | None:
    found = find_deterministic_error(exc)
    if found is not None:
        return found
    return next((item for item in _causes(exc) if isinstance(item, UserFacingError)), None)


def exit_on_user_error(run: Callable[[], T]) -> T:
    """Call ``run()``; if it fails with a :class:`UserFacingError` (a deterministic error first,
    anywhere in the chain, e.g. raised in a Ray worker), print ``error: <message>`` to stderr and
    exit with status 2. Any other exception propagates with its traceback (a bug)."""
    try:
        return run()
    except Exception as exc:
        found = _find_user_facing(exc)
        if found is None:
            raise
        sys.stderr.write(f"error: {user_error_message(found)}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
