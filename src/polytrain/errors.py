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


SYNONYMS = {
    "learning_rate": "lr", "batch_size": "global_batch_size", "max_length": "max_seq_len",
    "seq_len": "max_seq_len", "max_steps": "steps", "num_steps": "steps", "epochs": "steps",
    "gradient_clipping": "grad_clip", "max_grad_norm": "grad_clip", "warmup": "warmup_steps",
    "per_device_train_batch_size": "micro_batch_size", "output": "output_dir", "data_path": "train_path",
    "dataset": "train_path", "model_name_or_path": "hf_path",
}
"""What other trainers call a setting -> polytrain's name (the hint also matches a misspelt synonym)."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean `x`?)' hint for `name`, or '' when nothing is close: the closest candidate by spelling,
    else the candidate a (possibly misspelt) synonym from another trainer stands for."""
    candidates = list(candidates)
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not match:
        known = [s for s in SYNONYMS if SYNONYMS[s] in candidates]
        synonym = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        match = [SYNONYMS[synonym[0]]] if synonym else []
    return f" (did you mean `{match[0]}`?)" if match else ""
