"""How far the add2 benchmark checkpoint gets in 200 steps × 64 examples, whatever teaches it.

    python benchmarks/add2_ceiling.py [--steps 200] [--work runs/bench-rl]      # about 2–3 minutes

benchmarks/rl_vs_trl.py asks for 0.90 greedy accuracy after 200 steps × 64 completions from its
0.430 checkpoint. This script is not a peer comparison but a bound for that target, from the same
checkpoint (made by rl_vs_trl.py if --work has none) and the same budget of examples:
1. Supervised learning on the true answers (rl_vs_trl.py's `mle_on_truth`, fresh AdamW, 64 problems a
   step): training pairs as drawn; half of every batch problems with a one-digit operand (the ones
   policy gradient leaves wrong, a curriculum aimed at them); loss on the answer tokens only. At lr
   1e-4, 3e-4 and 1e-3 (the checkpoint's own).
2. The policy-gradient analogue of that curriculum, failure replay: pglm's best setting (REINFORCE,
   64 prompts × 1 sample, lr 1e-4, warm-up 10) where every prompt whose sample got reward 0 is
   queued, and each step takes a fraction of its 64 prompts from the queue, oldest first. Fraction 0
   is the best setting itself (rl_vs_trl.py's seed 0).
Each line gives the greedy accuracy on the 500 held-out problems, and on those with a one-digit operand.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment_line  # noqa: E402
from rl_vs_trl import TASK, accuracy, breakdown, make_checkpoint, mle_on_truth  # noqa: E402

from pglm.evaluate import evaluate_task  # noqa: E402
from pglm.models.hf import load_hf, wrap_hf  # noqa: E402
from pglm.pg.advantages import MovingBaseline  # noqa: E402
from pglm.pg.presets import get_preset  # noqa: E402
from pglm.runs import load_run  # noqa: E402
from pglm.train.rl import RLConfig, make_rl_optimizer, task_rows, train_rl  # noqa: E402


def with_failure_replay(draw_rows, reward_fn, share: float, per_step: int):
    """(draw_rows, reward_fn) where the reward queues each prompt it scores 0, and each step's first
    share × per_step prompts come from that queue (as many as it holds), the rest as drawn."""
    queue: collections.deque[dict] = collections.deque(maxlen=1024)

    def draw(step: int) -> list[dict]:
        rows = draw_rows(step)
        k = min(len(queue), int(share * per_step))
        return [queue.popleft() for _ in range(k)] + rows[k:]

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        scores = reward_fn(prompts, completions, **columns)
        queue.extend(TASK.row(p) for p, r in zip(prompts, scores) if r < 1.0)
        return scores

    return draw, reward


def replay_run(ckpt: Path, steps: int, share: float, out: Path):
    """pglm's model after `steps` steps of its best add2 setting with failure replay `share`."""
    shutil.rmtree(out, ignore_errors=True)
    init = load_run(f"hf:{ckpt}", torch.device("cpu"))
    model, tokenizer = init.model, init.tokenizer
    cfg = RLConfig(algo="reinforce", steps=steps, prompts_per_step=64, group_size=1, lr=1e-4, warmup_steps=10,
                   eval_every=steps, eval_samples=0, ckpt_every=steps, seed=0)
    draw, reward = with_failure_replay(task_rows(TASK, cfg.seed, 64), TASK.reward, share, 64)
    optimizer = make_rl_optimizer(model, None, cfg.lr, cfg)
    out.mkdir(parents=True, exist_ok=True)
    train_rl(model, tokenizer, get_preset("reinforce"), cfg, draw, reward,
             lambda m: evaluate_task(m, tokenizer, TASK, samples=0), TASK.max_new_tokens, out, optimizer,
             baseline=MovingBaseline(), progress=False)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="steps of 64 examples (default 200)")
    p.add_argument("--work", default="runs/bench-rl", help="where rl_vs_trl.py's checkpoint is (or goes)")
    args = p.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    import transformers

    transformers.logging.set_verbosity_error()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(environment_line())
    ckpt = make_checkpoint(work)
    start = accuracy(load_hf(f"hf:{ckpt}").inner, TASK.tokenizer())
    print(f"from {ckpt} (greedy accuracy {start:.3f}), {args.steps} steps × 64:", flush=True)

    def report(label: str, model) -> None:
        model = wrap_hf(model.eval()) if isinstance(model, transformers.PreTrainedModel) else model
        acc = evaluate_task(model, TASK.tokenizer(), TASK, samples=0)["accuracy"]
        one = breakdown(model)["a one-digit operand"]
        print(f"  {label:62s} {acc:.3f}   one-digit operand {one}", flush=True)

    for lr in (1e-4, 3e-4, 1e-3):  # 1e-3 made the checkpoint
        report(f"supervised, pairs as drawn, lr {lr:g}", mle_on_truth(ckpt, args.steps, lr))
        report(f"supervised, half one-digit-operand problems, lr {lr:g}", mle_on_truth(ckpt, args.steps, lr, one_digit_share=0.5))
        report(f"supervised, answer tokens only, lr {lr:g}", mle_on_truth(ckpt, args.steps, lr, answer_only=True))
    for share in (0.0, 0.25, 0.5):
        report(f"pglm reinforce 64 × 1, lr 1e-4, failure replay {share:g}",
               replay_run(ckpt, args.steps, share, work / f"replay-{share:g}"))


if __name__ == "__main__":
    main()
