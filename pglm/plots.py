"""Curves a person would rather look at than read: RUN/plots/*.png from RUN/metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from pglm.train.metrics import read_metrics


def _series(rows, phase, key):
    pts = [(r["step"], r[key]) for r in rows if r.get("phase") == phase and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(ys, window=10):
    """Trailing moving average: per-step RL figures are noisy."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir) -> list[Path]:
    """Draw the curves of a run (maximum likelihood and/or policy gradient); returns the files written."""
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

    rsteps, reward = _series(rows, "rl", "reward_mean")
    if rsteps:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot(rsteps, reward, lw=0.6, alpha=0.4, color="tab:blue", label="per step")
        axes[0].plot(rsteps, _smooth(reward), lw=1.8, color="tab:blue", label="mean of 10 steps")
        axes[0].set(xlabel="step", ylabel="mean reward of the samples", title="Reward (sampled at the training temperature)")
        axes[0].legend()
        esteps, acc = _series(rows, "eval", "accuracy")
        if esteps:
            axes[1].plot(esteps, acc, "o-", label="greedy accuracy", color="tab:green")
            for key, style in (("pass@1", "s--"), ("pass@8", "^--")):
                ks, kv = _series(rows, "eval", key)
                if ks:
                    axes[1].plot(ks, kv, style, label=key, lw=1, ms=4)
            axes[1].set_ylim(0, 1)
            axes[1].legend()
        axes[1].set(xlabel="step", ylabel="fraction of held-out problems solved", title="Held-out accuracy")
        for key, color in (("entropy", "tab:purple"), ("kl", "tab:red")):
            ks, kv = _series(rows, "rl", key)
            if ks:
                axes[2].plot(ks, _smooth(kv), label=f"{key} (mean of 10 steps)", color=color)
        axes[2].set(xlabel="step", ylabel="nats", title="Policy entropy per token and KL to the start")
        axes[2].legend()
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(run_dir.name)
        fig.tight_layout()
        path = out_dir / "rl.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
