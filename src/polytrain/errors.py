"""User-facing errors.

A `PolytrainError` is a mistake the user can fix (bad config, bad data, missing file). The CLI prints its one-line
message without a traceback and exits non-zero. Anything else is an internal bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PolytrainError(Exception):
    """Base class of errors caused by user input; `str(err)` is the whole message."""


class ConfigError(PolytrainError):
    """A config value or key is wrong."""


class DataError(PolytrainError):
    """A data file is missing, malformed or unusable."""


class BackendError(PolytrainError):
    """The requested device or feature is not available here."""


class RunDirError(PolytrainError):
    """The run directory is in a state that would lose or mix up work."""


class CheckpointError(PolytrainError):
    """A checkpoint is missing, incomplete or incompatible."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean `x`?)' hint for `name`, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""
