"""Metrics sinks: `metrics.jsonl` (one JSON object per logged step), TensorBoard, and the chosen experiment trackers
(`train/trackers.py`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polytrain.objectives.base import Metric
    from polytrain.train.trackers import Tracker

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def tensorboard_tag(key: str) -> str:
    """eval_loss -> eval/loss; loss -> train/loss."""
    return "eval/" + key[5:] if key.startswith("eval_") else "train/" + key


class MetricsWriter:
    """Appends records to metrics.jsonl, TensorBoard and the `trackers`. On resume, records past the resumed step
    (written after the checkpoint the run went back to) are dropped so the history has one record per step.
    TensorBoard's Custom Scalars tab gets a "headline" chart per `headline` metric, train and eval together."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0, headline: tuple[Metric, ...] = (),
                 trackers: list[Tracker] | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        with self.path.open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            if headline:
                charts = {m.label: ["Multiline", [tensorboard_tag(m.key), tensorboard_tag("eval_" + m.key)]]
                          for m in headline}
                self._tb.add_custom_scalars({"headline": charts})
        self._trackers = trackers or []

    def rewind(self, step: int) -> None:
        """Drop records after `step` (a rollback went back there; those steps will be recomputed)."""
        self._file.close()
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        with self.path.open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {tensorboard_tag(key): value for key, value in clean.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
        for tracker in self._trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        """Idempotent: the trainer closes the sinks on every way out of the loop."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
