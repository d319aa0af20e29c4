"""The two error bases every layer shares (plain Python: teachers and students use them too).

:class:`DeterministicError` marks a user error that fails the same way on every retry (a bad
weights file, a corrupt image, an invalid configuration): Ray Train never retries it and the jobs
print it as one ``error:`` line. ``distillery.platform.errors`` has the handling.
"""

from __future__ import annotations

__all__ = ["DeterministicError", "UserFacingError"]


class UserFacingError(Exception):
    """An error whose message is all a user needs (it names the file, field or URI): the command
    line prints it without a traceback. It may still succeed on retry (storage out of reach)."""


class DeterministicError(UserFacingError):
    """An error that fails the same way on every retry; its message names the file or field."""
