"""pglm demo: the whole chain on add2 with a flawed teacher (pglm/demo.py), and its report."""

from __future__ import annotations

import sys
from pathlib import Path

from pglm.errors import UserError


def cmd_demo(args):
    from pglm.demo import DemoConfig, run_demo
    from pglm.pg.presets import get_preset
    from pglm.plots import plot_run
    from pglm.train.rundir import RunDir

    get_preset(args.algo)
    if args.model not in ("gpt", "lstm"):
        raise UserError(f"unknown model '{args.model}'; choose gpt or lstm")
    if not 0.0 <= args.flaw_rate <= 1.0:
        raise UserError("--flaw-rate must be between 0 and 1")
    cfg = DemoConfig(algo=args.algo, model=args.model, flaw_rate=args.flaw_rate, seed=args.seed, quick=args.quick)
    with RunDir(args.out, overwrite=args.overwrite) as out:  # a demo stopped before its first checkpoint leaves nothing
        try:
            s = run_demo(cfg, Path(out), progress=not args.quiet)
        except KeyboardInterrupt:
            latest = _latest(Path(out))
            hint = (f"{latest} loads (pglm eval --ckpt {latest} --task add2); tune it further with: "
                    f"pglm rl --init {latest} --task add2 --algo {args.algo} --out {out}-rl; or start the demo "
                    "again with --overwrite") if latest else "nothing was saved yet; start the demo again"
            print(f"\ninterrupted: {hint}", file=sys.stderr)
            raise
        plots = plot_run(out)
        _report(s, out, plots)


def _latest(out: Path):
    for run in (out / "mle_only", out):
        if (run / "checkpoints" / "latest").is_file():
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
    print(f"\nwritten to {out} (summary.json, metrics.jsonl, plots: {', '.join(p.name for p in plots)})")
