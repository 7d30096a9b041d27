"""`polytrain plot RUN_DIR`: one PNG of a run's curves: the loss, each of the objective's headline metrics (train
and eval), the learning rate and the gradient norm."""

from __future__ import annotations

import math
from pathlib import Path

from polytrain.errors import PolytrainError, RunDirError
from polytrain.objectives.base import Objective
from polytrain.train.metrics import METRICS_FILE, read_metrics


def run_objective(run_dir: Path) -> type[Objective]:
    """The objective class of a run (its headline metrics and loss label), or the base class when the run's
    algorithm cannot be looked up (a custom objective not registered in this process)."""
    from polytrain.config import read_run_config
    from polytrain.objectives import registry

    try:
        return registry.objective_class(read_run_config(run_dir).run.algorithm)
    except PolytrainError:
        return Objective


def plot_run(run_dir: str | Path, out: str | Path | None = None, objective: type[Objective] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise RunDirError(f"{run_dir}: no {METRICS_FILE} records to plot (is this a run directory?)")
    out = Path(out) if out else run_dir / "loss.png"
    objective = objective or run_objective(run_dir)

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    # (title, y label, keys drawn): the loss first, then the headline metrics that were logged
    panels = [("loss", objective.loss_label, "loss")]
    panels += [(m.label, "", m.key) for m in objective.headline
               if m.key != "loss" and (series(m.key)[0] or series("eval_" + m.key)[0])]
    panels += [("learning rate", "", "lr"), ("gradient norm (pre-clip)", "", "grad_norm")]
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, ylabel, key) in zip(axes.flat, panels):
        for name, label in ((key, "train"), ("eval_" + key, "eval")):
            steps, values = series(name)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if name.startswith("eval_") else None)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{run_dir.name} ({objective.name})" if objective is not Objective else run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
