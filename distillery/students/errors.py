"""The error every student weights loader raises for a file that cannot be read or does not fit.

Its own module (plain Python) so that the lowest loaders (:mod:`.backbone`, :mod:`.deimv2_backbone`,
:mod:`.official`) raise it without importing :mod:`.weights`, which imports them.
"""

from __future__ import annotations

from distillery.errors import DeterministicError

__all__ = ["WeightsError"]


class WeightsError(ValueError, DeterministicError):
    """A weights file that cannot be read or does not fit the student; the first line names the file
    and says what is wrong (and what the file looks like when that can be told), then a few names.
    Deterministic: a Ray Train retry would read the same file again."""
