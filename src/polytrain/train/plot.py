"""`polytrain plot RUN_DIR`: loss (train and eval), learning rate and gradient norm curves to one PNG."""

from __future__ import annotations

from pathlib import Path

from polytrain.errors import RunDirError
from polytrain.train.metrics import METRICS_FILE, read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise RunDirError(f"{run_dir}: no {METRICS_FILE} records to plot (is this a run directory?)")
    out = Path(out) if out else run_dir / "loss.png"

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (ax_loss, ax_lr, ax_norm) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        steps, values = series(key)
        if steps:
            ax_loss.plot(steps, values, label=label, marker="o" if key == "eval_loss" else None)
    ax_loss.set(title="loss (mean per trained token)", xlabel="step", ylabel="cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for ax, key, title in ((ax_lr, "lr", "learning rate"), (ax_norm, "grad_norm", "gradient norm (pre-clip)")):
        steps, values = series(key)
        ax.plot(steps, values)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
