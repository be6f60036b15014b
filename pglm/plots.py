"""Curves a person would rather look at than read: RUN/plots/*.png from RUN/metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from pglm.train.metrics import read_metrics


def _series(rows, phase, key):
    pts = [(r["step"], r[key]) for r in rows if r.get("phase") == phase and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir) -> list[Path]:
    """Draw the training curves of a run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works with no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    steps, loss = _series(rows, "mle", "loss")
    vsteps, vloss = _series(rows, "eval", "val_loss")
    if steps or vsteps:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(steps, loss, label="training loss", lw=1)
        ax1.plot(vsteps, vloss, "o-", label="validation loss", lw=1.5)
        ax1.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="Maximum likelihood")
        ax1.grid(alpha=0.3)
        ax1.legend()
        asteps, acc = _series(rows, "eval", "val_token_acc")
        ax2.plot(asteps, acc, "o-", color="tab:green")
        ax2.set(xlabel="optimizer step", ylabel="next-token accuracy", title="Validation next-token accuracy")
        ax2.grid(alpha=0.3)
        fig.suptitle(run_dir.name)
        fig.tight_layout()
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
