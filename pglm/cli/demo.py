"""pglm demo: the whole chain on add2 with a flawed teacher (pglm/demo.py), or with --rlhf the chain
through a learned reward (pglm/demo_rlhf.py), and their reports."""

from __future__ import annotations

import sys
from pathlib import Path

from pglm.errors import UserError


def cmd_demo(args):
    from pglm.pg.presets import get_preset
    from pglm.plots import plot_run
    from pglm.train.rundir import RunDir

    args.algo = args.algo or ("rloo" if args.rlhf else "grpo")
    args.out = args.out or ("runs/demo-rlhf" if args.rlhf else "runs/demo")
    get_preset(args.algo)
    if args.model not in ("gpt", "lstm"):
        raise UserError(f"unknown model '{args.model}'; choose gpt or lstm")
    if not 0.0 <= args.flaw_rate <= 1.0:
        raise UserError("--flaw-rate must be between 0 and 1")
    if not 0.5 <= args.rater_accuracy <= 1.0:
        raise UserError(f"--rater-accuracy must be between 0.5 (a coin) and 1 (always right), not {args.rater_accuracy}")
    if args.rater_accuracy != 0.8 and not args.rlhf:
        raise UserError("--rater-accuracy is a setting of the RLHF chain; add --rlhf")
    with RunDir(args.out, overwrite=args.overwrite) as out:  # a demo stopped before its first checkpoint leaves nothing
        try:
            if args.rlhf:
                from pglm.demo_rlhf import RLHFConfig, run_rlhf_demo

                cfg = RLHFConfig(algo=args.algo, model=args.model, flaw_rate=args.flaw_rate, seed=args.seed,
                                 rater_accuracy=args.rater_accuracy, quick=args.quick)
                s = run_rlhf_demo(cfg, Path(out), progress=not args.quiet)
            else:
                from pglm.demo import DemoConfig, run_demo

                cfg = DemoConfig(algo=args.algo, model=args.model, flaw_rate=args.flaw_rate, seed=args.seed,
                                 quick=args.quick)
                s = run_demo(cfg, Path(out), progress=not args.quiet)
        except KeyboardInterrupt:
            latest = _latest(Path(out))
            hint = (f"{latest} loads (pglm eval --ckpt {latest} --task add2); tune it further with: "
                    f"pglm rl --init {latest} --task add2 --algo {args.algo} --out {out}-rl; or start the demo "
                    "again with --overwrite") if latest else "nothing was saved yet; start the demo again"
            print(f"\ninterrupted: {hint}", file=sys.stderr)
            raise
        plots = [p for run in _runs(Path(out)) for p in plot_run(run)]
        (_report_rlhf if args.rlhf else _report)(s, out, plots)


def _runs(out: Path) -> list[Path]:
    """The demo's run directories, the last written first: its phases after the first have their own."""
    return [run for run in (out / "rl-no-kl", out / "rl-kl", out / "reward", out / "mle_only", out)
            if (run / "metrics.jsonl").is_file()]


def _latest(out: Path):
    for run in _runs(out):
        if run.name != "reward" and (run / "checkpoints" / "latest").is_file():
            return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return None


def _report(s: dict, out: Path, plots) -> None:
    rows = [("after maximum likelihood (phase 1)", s["after_mle"], s["wall_time_s"]["mle"], s["mle_steps"]),
            (f"after policy gradient, {s['algo']} (phase 2)", s["after_rl"], s["wall_time_s"]["rl"], s["rl_steps"]),
            ("maximum likelihood only (phase 3)", s["mle_only"], s["wall_time_s"]["mle_only"], s["mle_only_steps"])]
    print(f"\nadd2, 500 held-out problems; the teacher dropped the carry in {s['flaw_rate']:.0%} of carry problems")
    print(f"{'':44} {'accuracy':>8} {'carry':>6} {'no carry':>8} {'teacher mistake':>15} {'pass@8':>6} {'steps':>6} {'time':>7}")
    for name, r, t, n in rows:
        p8 = f"{r['pass@8']:.3f}" if "pass@8" in r else ""
        print(f"{name:44} {r['accuracy']:8.3f} {r['accuracy_carry']:6.3f} {r['accuracy_no_carry']:8.3f} "
              f"{r['teacher_mistake_on_carry']:15.3f} {p8:>6} {n:6d} {t:6.1f}s")
    t = s["wall_time_s"]
    budget = ("at least as much time as phase 2" if t["mle_only"] >= t["rl"]
              else f"{t['mle_only']:.0f} s against phase 2's {t['rl']:.0f} s")
    print("\nphase 2 learned from the reward alone, never from a solution; phase 3 continued phase 1 on the\n"
          f"teacher's data for {s['mle_only_steps']} steps, {budget}. Carry problems:")
    for e in s["examples"]:
        print(f"  {e['prompt']}{e['answer']:<4}  maximum likelihood: {e['maximum_likelihood']:<4}  policy gradient: {e['policy_gradient']}")
    print(f"\nwritten to {out} (summary.json, metrics.jsonl, plots: {_names(plots, out)})")


def _report_rlhf(s: dict, out: Path, plots) -> None:
    rm, t = s["reward_model"], s["wall_time_s"]
    print(f"\nadd2, 500 held-out problems; the teacher dropped the carry in {s['flaw_rate']:.0%} of carry problems; "
          f"the rater was right {s['pairs']['rater_right']:.0%} of the time")
    print(f"reward model ({s['pairs']['train_pairs']:,} pairs, {s['rm_steps']} steps, {t['reward_model']:.0f} s): "
          f"pairwise accuracy on {s['pairs']['val_pairs']} held-out pairs {rm['val_accuracy']:.3f} against the rater, "
          f"{rm['val_accuracy_vs_truth']:.3f} against the truth")
    print(f"{'':34} {'true accuracy':>13} {'carry':>6} {'no carry':>8} {'proxy':>6} {'steps':>6} {'time':>7}")
    start = s["rl"]["rl-kl"]["curve"][0]
    print(f"{'after SFT':34} {s['after_sft']['accuracy']:13.3f} {s['after_sft']['accuracy_carry']:6.3f} "
          f"{s['after_sft']['accuracy_no_carry']:8.3f} {start['proxy']:6.2f} {s['sft_steps']:6d} {t['sft']:6.1f}s")
    for name, r in s["rl"].items():
        label = f"RLHF, {s['algo']}, " + (f"KL β = {r['beta']:g}" if r["beta"] else "no KL")
        e, best = r["final"], r["best_true"]
        print(f"{label:34} {e['accuracy']:13.3f} {e['accuracy_carry']:6.3f} {e['accuracy_no_carry']:8.3f} "
              f"{e['proxy']:6.2f} {s['rl_steps']:6d} {t[name]:6.1f}s")
        print(f"{'  its best true accuracy':34} {best['accuracy']:13.3f} {'':6} {'':8} {best['proxy']:6.2f} "
              f"{'at ' + str(best['step']):>6}")
    print("\nproxy: the reward model's mean score of the greedy answers; true: the exact sum. Carry problems "
          "(answer, proxy):")
    for e in s["examples"]:
        cells = "  ".join(f"{name}: {e[name]['answer']:<4} ({e[name]['proxy']:+.2f})" for name in ("sft", "rl-kl", "rl-no-kl"))
        print(f"  {e['prompt'] + e['answer']:<11} {cells}")
    print(f"\nwritten to {out} (summary.json; runs reward, rl-kl, rl-no-kl; plots: {_names(plots, out)})")


def _names(plots, out) -> str:
    return ", ".join(str(p.relative_to(out)) for p in plots)
