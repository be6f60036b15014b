"""`pglm demo`: maximum likelihood imitates its teacher; policy gradient optimises the reward.

The whole chain on add2 with a flawed teacher: on most problems with a carry from the units digit,
the teacher forgets the carry ("37+45=72"), one fixed answer per problem; everything else it gets
right (setting measured in docs/design.md, "The flawed teacher").

 1. Maximum likelihood on the teacher's solved problems, for at least 1,500 steps and until the model
    does what the teacher does right: greedy accuracy ≥ 0.95 on no-carry problems set aside from the
    training pairs (a signal that never looks at the 500 held-out problems the demo reports on).
 2. Policy gradient from there, with the true reward (1 for the exact sum) and never a solution.
 3. The honest comparison: maximum likelihood alone, continued from the same point on the same
    teacher data, for at least as long as phase 2 took (its wall time is recorded beside it).
 4. The 500 held-out problems before and after: greedy accuracy overall and split by carry, pass@k,
    and how often a carry answer is exactly the teacher's mistake.

Every step count is fixed or decided by a deterministic signal, so the same seed gives the same
figures on CPU; only the wall times vary.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pglm import __version__
from pglm.data import sft_batch, sft_example
from pglm.evaluate import evaluate_task
from pglm.models import build_model, count_params, model_config
from pglm.pg.presets import describe, get_preset
from pglm.sampling import complete
from pglm.tasks import get_task
from pglm.tasks.add2 import has_carry, parse_prompt
from pglm.train.checkpoint import write_json
from pglm.train.metrics import MetricsLog
from pglm.train.mle import TrainConfig, make_optimizer, train_mle
from pglm.train.rl import RLConfig, ValueHead, make_rl_optimizer, task_rows, train_rl


@dataclass
class DemoConfig:
    algo: str = "grpo"  # policy-gradient preset for phase 2
    model: str = "gpt"  # gpt (2 layers × 128) or lstm (1 layer × 256)
    flaw_rate: float = 0.7  # share of carry problems whose teacher answer drops the carry
    seed: int = 0  # seeds data, initialisation and sampling
    quick: bool = False  # a smaller, shorter chain for tests and CI
    mle_min_steps: int = 1500  # phase 1 runs at least this long (docs/demo.md: an early stop left a weak start)
    mle_max_steps: int = 2000  # phase 1 ends at the signal, or here
    mle_batch: int = 64  # solved problems per maximum-likelihood step
    mle_lr: float = 1e-3  # constant, no weight decay: a flatter start for policy gradient (docs/rl.md)
    signal_every: int = 50  # steps between checks of the stopping signal
    signal_threshold: float = 0.95  # no-carry greedy accuracy that ends phase 1
    rl_steps: int = 500  # phase 2 steps
    rl_lr: float = 2e-4  # peak, after a 50-step warm-up (docs/design.md: 3e-4 without warm-up collapsed) ...
    rl_warmup: int = 50
    rl_min_lr_frac: float = 0.1  # ... then a cosine down to 2e-5, which settles the accuracy at the end (docs/demo.md)
    prompts_per_step: int = 16
    group_size: int = 8
    eval_every: int = 50  # steps between held-out evaluations in phases 2 and 3
    passk_samples: int = 8  # samples per held-out problem for the final pass@k
    mle_only_steps_per_rl_step: int = 2  # phase 3 budget; a maximum-likelihood step is cheaper (docs/demo.md)

    def __post_init__(self):
        if self.quick:  # the same chain, cut short: phase 1 ends at 800 steps at the latest
            self.mle_min_steps, self.mle_max_steps, self.signal_every, self.signal_threshold = 0, 800, 100, 0.9
            self.rl_steps, self.eval_every = 100, 50


def teacher_answer(a: int, b: int, flaw_rate: float, seed: int) -> str:
    """The flawed teacher: drops the units carry with probability flaw_rate, one fixed answer per pair."""
    if has_carry(a, b) and random.Random(f"teacher:{seed}:{a}:{b}").random() < flaw_rate:
        return str(a + b - 10)
    return str(a + b)


def carry_report(model, tokenizer, rows: list[dict]) -> dict:
    """Greedy accuracy overall, on carry and no-carry problems, and the share of carry answers that
    are exactly the teacher's mistake (a + b − 10)."""
    return carry_figures(rows, _answers(model, tokenizer, rows))


def carry_figures(rows: list[dict], answers: list[str]) -> dict:
    """`carry_report` of given answers (stripped texts) to add2 rows."""
    carry = {"ok": 0, "n": 0, "mistake": 0}
    plain = {"ok": 0, "n": 0}
    for r, ans in zip(rows, answers):
        a, b = parse_prompt(r["prompt"])
        ok = ans == str(a + b)
        if has_carry(a, b):
            carry["n"] += 1
            carry["ok"] += ok
            carry["mistake"] += ans == str(a + b - 10)
        else:
            plain["n"] += 1
            plain["ok"] += ok
    return {
        "accuracy": (carry["ok"] + plain["ok"]) / len(rows),
        "accuracy_carry": carry["ok"] / max(carry["n"], 1),
        "accuracy_no_carry": plain["ok"] / max(plain["n"], 1),
        "teacher_mistake_on_carry": carry["mistake"] / max(carry["n"], 1),
    }


class Teacher:
    """The flawed teacher's solved problems as maximum-likelihood batches, each problem built once."""

    def __init__(self, tokenizer, flaw_rate: float, seed: int, batch_size: int):
        self.tok, self.flaw_rate, self.seed, self.batch_size = tokenizer, flaw_rate, seed, batch_size
        self.task = get_task("add2")
        self.solved: dict[str, object] = {}  # prompt -> the teacher's solved example

    def examples(self, rows: list[dict]) -> list:
        for r in rows:
            if r["prompt"] not in self.solved:
                answer = teacher_answer(*parse_prompt(r["prompt"]), self.flaw_rate, self.seed)
                self.solved[r["prompt"]] = sft_example(self.tok, r["prompt"], answer, 16)
        return [self.solved[r["prompt"]] for r in rows]

    def get_batch(self, rng):  # a train_mle batch: batch_size problems drawn from the training pairs
        rows = self.task.train_prompts(random.Random(int(rng.integers(2**63))), self.batch_size)
        return sft_batch(self.examples(rows), self.tok.pad_id)


def start_demo(cfg, out: Path, command: str) -> tuple[torch.nn.Module, object, dict, MetricsLog]:
    """The demo's model (GPT 2 × 128 or LSTM 1 × 256, seeded), tokenizer and config, written to `out`."""
    tok = get_task("add2").tokenizer()
    torch.manual_seed(cfg.seed)
    size = dict(n_layer=2, d_model=128, n_head=4) if cfg.model == "gpt" else dict(n_layer=1, d_model=256)
    model = build_model(model_config(cfg.model, "tiny", vocab_size=tok.vocab_size, block_size=16, **size))
    tok.save(out / "tokenizer.json")
    config = {"pglm_version": __version__, "command": command, "demo": asdict(cfg), "model": asdict(model.config),
              "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size}, "n_params": count_params(model)}
    write_json(out / "config.json", config)
    return model, tok, config, MetricsLog(out)


def imitate_teacher(model, teacher: Teacher, out: Path, metrics: MetricsLog, *, seed: int, min_steps: int,
                    max_steps: int, lr: float, signal_every: int, signal_threshold: float, progress: bool,
                    heldout_every: int = 3) -> tuple[int, TrainConfig, list]:
    """Phase 1: maximum likelihood on the teacher's solutions, for at least `min_steps` and until greedy
    accuracy on 200 no-carry training problems (where the teacher is right) reaches the threshold, or
    `max_steps`. Every `heldout_every`-th check also evaluates the held-out problems, for the curves.
    Returns (the step it stopped at, its TrainConfig, the validation examples)."""
    tok, heldout = teacher.tok, teacher.task.heldout()
    rng = random.Random(f"signal:{seed}")
    signal_rows = [r for r in teacher.task.train_prompts(rng, 400) if not has_carry(*parse_prompt(r["prompt"]))][:200]
    mle_cfg = TrainConfig(steps=max_steps, batch_size=teacher.batch_size, lr=lr, min_lr_frac=1.0, warmup_steps=10,
                          weight_decay=0.0, eval_every=signal_every, ckpt_every=10**9, log_every=10, seed=seed)
    val = teacher.examples(signal_rows)
    checks = iter(range(10**9))

    def signal(m):  # the stopping signal; every few times also the held-out figures, for the curves only
        figures = {"signal_no_carry_accuracy": carry_report(m, tok, signal_rows)["accuracy_no_carry"]}
        return {**figures, **carry_report(m, tok, heldout)} if next(checks) % heldout_every == 0 else figures

    train_mle(model, make_optimizer(model, mle_cfg), mle_cfg, teacher.get_batch, lambda n: [sft_batch(val, tok.pad_id)],
              out, metrics=metrics, progress=progress, evaluator=signal,
              stop_when=lambda step, ev: step >= min_steps and ev["signal_no_carry_accuracy"] >= signal_threshold)
    k = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    return k, mle_cfg, val


def run_demo(cfg: DemoConfig, out: Path, progress: bool = True) -> dict:
    task = get_task("add2")
    heldout = task.heldout()
    model, tok, config, metrics = start_demo(cfg, out, "demo")
    teacher = Teacher(tok, cfg.flaw_rate, cfg.seed, cfg.mle_batch)
    print(f"demo: add2 with a teacher that drops the carry in {cfg.flaw_rate:.0%} of carry problems; "
          f"{cfg.model} with {config['n_params']:,} parameters → {out}")

    print("phase 1: maximum likelihood on the teacher's solutions")
    t0 = time.perf_counter()
    k, mle_cfg, val = imitate_teacher(model, teacher, out, metrics, seed=cfg.seed, min_steps=cfg.mle_min_steps,
                                      max_steps=cfg.mle_max_steps, lr=cfg.mle_lr, signal_every=cfg.signal_every,
                                      signal_threshold=cfg.signal_threshold, progress=progress)
    t_mle = time.perf_counter() - t0
    after_mle = carry_report(model, tok, heldout)
    mle_model = copy.deepcopy(model)  # the starting point of both phase 2 and phase 3

    # Phase 2: policy gradient with the true reward.
    preset = get_preset(cfg.algo)
    rl_cfg = RLConfig(algo=cfg.algo, steps=k + cfg.rl_steps, prompts_per_step=cfg.prompts_per_step,
                      group_size=cfg.group_size, lr=cfg.rl_lr, warmup_steps=cfg.rl_warmup, min_lr_frac=cfg.rl_min_lr_frac,
                      eval_every=cfg.eval_every, ckpt_every=10**9, seed=cfg.seed, first_step=k)
    print(f"phase 2: {describe(preset, 0.0, cfg.group_size, task.max_new_tokens)}")
    t0 = time.perf_counter()
    value_head = ValueHead(model.config.d_model) if preset.estimator.values else None  # PPO's critic
    train_rl(model, tok, preset, rl_cfg, task_rows(task, cfg.seed, cfg.prompts_per_step), task.reward,
             lambda m: carry_report(m, tok, heldout), task.max_new_tokens, out,
             make_rl_optimizer(model, value_head, cfg.rl_lr, rl_cfg), value_head=value_head, start_step=k,
             metrics=metrics, progress=progress)
    t_rl = time.perf_counter() - t0
    after_rl = carry_report(model, tok, heldout)
    passk_rl = evaluate_task(model, tok, task, samples=cfg.passk_samples, seed=cfg.seed)

    # Phase 3: maximum likelihood alone, from the same point, for at least phase 2's time.
    print("phase 3 (the comparison): maximum likelihood alone, continued on the teacher's solutions")
    mle_only_dir = out / "mle_only"  # a run directory of its own: its checkpoints load like any other
    mle_only_dir.mkdir()
    tok.save(mle_only_dir / "tokenizer.json")
    write_json(mle_only_dir / "config.json", {**config, "command": "demo-mle-only"})
    only_cfg = TrainConfig(**{**asdict(mle_cfg), "steps": k + cfg.rl_steps * cfg.mle_only_steps_per_rl_step,
                              "eval_every": cfg.eval_every * cfg.mle_only_steps_per_rl_step})
    only_metrics = MetricsLog(mle_only_dir, elapsed=metrics.elapsed() - t_rl)  # its clock starts where phase 2's did
    only_metrics.log(k, "eval", **after_mle)  # the branch point, shared with phase 2
    t0 = time.perf_counter()
    train_mle(mle_model, make_optimizer(mle_model, only_cfg), only_cfg, teacher.get_batch,
              lambda n: [sft_batch(val, tok.pad_id)],
              mle_only_dir, start_step=k, metrics=only_metrics, progress=progress,
              evaluator=lambda m: carry_report(m, tok, heldout))
    t_only = time.perf_counter() - t0
    after_only = carry_report(mle_model, tok, heldout)
    passk_mle = evaluate_task(mle_model, tok, task, samples=cfg.passk_samples, seed=cfg.seed)

    examples = []
    carry_rows = [r for r in heldout if has_carry(*parse_prompt(r["prompt"]))][:6]
    rl_answers = _answers(model, tok, carry_rows)
    mle_answers = _answers(mle_model, tok, carry_rows)
    for r, a_rl, a_mle in zip(carry_rows, rl_answers, mle_answers):
        examples.append({"prompt": r["prompt"], "answer": r["answer"], "maximum_likelihood": a_mle, "policy_gradient": a_rl})

    summary = {
        "flaw_rate": cfg.flaw_rate, "algo": cfg.algo, "model": cfg.model, "seed": cfg.seed,
        "mle_steps": k, "rl_steps": cfg.rl_steps, "mle_only_steps": only_cfg.steps - k,
        "wall_time_s": {"mle": round(t_mle, 1), "rl": round(t_rl, 1), "mle_only": round(t_only, 1)},
        "after_mle": after_mle, "after_rl": {**after_rl, **_passk(passk_rl)},
        "mle_only": {**after_only, **_passk(passk_mle)}, "examples": examples,
    }
    write_json(out / "summary.json", summary)
    metrics.close()
    only_metrics.close()
    return summary


def _answers(model, tok, rows) -> list[str]:
    """Greedy answers to add2 rows, stripped (the model's train/eval mode is left as it was)."""
    return [t.strip() for t in greedy_texts(model, tok, [r["prompt"] for r in rows])]


def greedy_texts(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy add2 completions as a reward reads them; the model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    _, texts = complete(model, tokenizer, prompts, get_task("add2").max_new_tokens, greedy=True)
    model.train(was_training)
    return texts


def _passk(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k.startswith("pass@")}
