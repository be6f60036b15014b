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


def _save(plt, fig, path: Path, **kwargs) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, **kwargs)
    plt.close(fig)
    return path


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
    pairs = any("val_accuracy" in r for r in rows)  # a reward model: its loss is per pair
    if steps or vsteps:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(steps, loss, label="training loss", lw=1)
        ax1.plot(vsteps, vloss, "o-", label="validation loss", lw=1.5)
        ax1.set(xlabel="optimizer step", ylabel=f"loss (nats per {'pair' if pairs else 'token'})",
                title="Maximum likelihood")
        ax1.grid(alpha=0.3)
        ax1.legend()
        asteps, acc = _series(rows, "eval", "val_accuracy" if pairs else "val_token_acc")
        ax2.plot(asteps, acc, "o-", color="tab:green")
        what = "pairwise accuracy (chosen scored higher)" if pairs else "next-token accuracy"
        ax2.set(xlabel="optimizer step", ylabel=what, title=f"Validation {what}")
        ax2.grid(alpha=0.3)
        fig.suptitle(run_dir.name)
        written.append(_save(plt, fig, out_dir / "loss.png"))

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
        written.append(_save(plt, fig, out_dir / "rl.png"))
    if (run_dir / "mle_only" / "metrics.jsonl").is_file():
        written.append(_plot_demo(plt, run_dir, rows, read_metrics(run_dir / "mle_only" / "metrics.jsonl"), out_dir))
    if (run_dir / "rl-kl" / "metrics.jsonl").is_file() and (run_dir / "rl-no-kl" / "metrics.jsonl").is_file():
        written.append(_plot_rlhf(plt, run_dir, out_dir))
    return written


def _plot_demo(plt, run_dir: Path, rows, only_rows, out_dir: Path) -> Path:
    """pglm demo: the policy-gradient branch and the maximum-likelihood-only branch on one time axis."""

    def evals(rs, key):
        pts = [(r["time"], r[key]) for r in rs if r.get("phase") == "eval" and r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    rl_start = min((r["time"] for r in rows if r.get("phase") == "rl"), default=None)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    panels = [("accuracy", "greedy accuracy, all 500 held-out problems"),
              ("accuracy_carry", "greedy accuracy on problems with a carry"),
              ("teacher_mistake_on_carry", "carry answers that are the teacher's mistake")]
    for ax, (key, title) in zip(axes, panels):
        t, v = evals(rows, key)
        ax.plot(t, v, "o-", color="tab:blue", ms=3, label="maximum likelihood, then policy gradient")
        t, v = evals(only_rows, key)
        ax.plot(t, v, "s--", color="tab:orange", ms=3, label="maximum likelihood only")
        if rl_start is not None:
            ax.axvline(rl_start, color="grey", lw=0.8, ls=":")
            ax.text(rl_start, 0.02, " policy gradient starts", fontsize=8, color="grey", va="bottom")
        ax.set(xlabel="seconds of training", ylim=(0, 1.08), title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{run_dir.name}: the same teacher data, two ways to continue")
    return _save(plt, fig, out_dir / "demo.png", bbox_inches="tight")


def _plot_rlhf(plt, run_dir: Path, out_dir: Path) -> Path:
    """pglm demo --rlhf: along each policy-gradient run, the true accuracy and the reward model's score
    (the proxy) of the same greedy answers, on one panel per run."""
    import json

    beta = json.loads((run_dir / "rl-kl" / "config.json").read_text(encoding="utf-8")).get("beta")
    runs = [("rl-kl", f"with a KL penalty (β = {beta:g})" if beta else "with a KL penalty"), ("rl-no-kl", "without KL")]
    fig, axes = plt.subplots(1, len(runs), figsize=(12, 4.2))
    proxies = []
    for name, _ in runs:
        proxies += _series(read_metrics(run_dir / name / "metrics.jsonl"), "eval", "proxy")[1]
    lo, hi = min(proxies), max(proxies)
    for ax, (name, title) in zip(axes, runs):
        rows = read_metrics(run_dir / name / "metrics.jsonl")
        steps, acc = _series(rows, "eval", "accuracy")
        ax.plot(steps, acc, "o-", ms=3, color="tab:green", label="true: greedy accuracy (left)")
        ax.set(xlabel="policy-gradient step", ylabel="fraction of 500 held-out problems solved", ylim=(0, 1), title=title)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        steps, proxy = _series(rows, "eval", "proxy")
        twin.plot(steps, proxy, "s--", ms=3, color="tab:red", label="proxy: reward model's score (right)")
        twin.set(ylabel="mean reward-model score", ylim=(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)))
        lines = ax.get_lines()[:1] + twin.get_lines()[:1]
        ax.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8)
    fig.suptitle(f"{run_dir.name}: policy gradient against a learned reward, the proxy beside the truth")
    return _save(plt, fig, out_dir / "rlhf.png", bbox_inches="tight")
