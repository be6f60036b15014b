"""`pglm demo --rlhf`: the chain of reinforcement learning from human feedback, on add2 and a CPU.

The reward a policy usually optimises is not the true one but a reward model learned from people's
comparisons (Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT), and a policy that optimises
such a proxy long and hard enough finds where the proxy is wrong: the proxy keeps rising while the
true quality stops and falls (Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model
Overoptimization"). Here every step of it runs in a few minutes, with the true quality measurable:

 1. SFT: maximum likelihood on the flawed teacher's solutions (pglm/demo.py's phase 1, shorter).
 2. Preference pairs: for every training problem, two different answers sampled from the SFT model;
    a rater prefers the one closer to the true sum (an answer that is not a number is worst), and is
    right with probability `rater_accuracy`, as people are not always right. Ties are left out. The
    pairs are written as preference JSONL (RUN/prefs), so `pglm reward` reads them as it would read
    anyone's.
 3. A reward model (Bradley–Terry; pglm/train/reward.py) from the SFT model with a scalar head, on
    90 % of the problems' pairs; its pairwise accuracy on the other 10 %, against the rater's labels
    and against the truth.
 4. Policy gradient from the SFT model against the reward model, with a KL penalty to the SFT model
    (max E[r] − β·KL) and without one. Every few steps, on the 500 held-out problems: the true greedy
    accuracy, and the proxy (the reward model's mean score of the same greedy answers).

Every run is a run directory of its own (RUN/reward, RUN/rl-kl, RUN/rl-no-kl) that `pglm eval`,
`pglm rl --reward rm:RUN/reward` and the other verbs take. docs/rlhf.md has the measured figures.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pglm.demo import Teacher, carry_figures, carry_report, greedy_texts, imitate_teacher, start_demo
from pglm.models.reward import RewardModel
from pglm.pg.presets import describe, get_preset
from pglm.rewards.learned import reward_model
from pglm.sampling import complete
from pglm.tasks import get_task
from pglm.tasks.add2 import TRAIN_PAIRS, has_carry, parse_prompt, prompt_of
from pglm.train.checkpoint import write_json
from pglm.train.metrics import MetricsLog, read_metrics
from pglm.train.mle import TrainConfig, make_optimizer, train_mle
from pglm.train.reward import evaluate_pairs, pair_batch, read_preferences, reward_step
from pglm.train.rl import RLConfig, ValueHead, frozen_copy, make_rl_optimizer, task_rows, train_rl


@dataclass
class RLHFConfig:
    model: str = "gpt"  # gpt (2 layers × 128) or lstm (1 layer × 256)
    flaw_rate: float = 0.7  # share of carry problems whose teacher answer drops the carry
    seed: int = 0  # seeds data, initialisation, sampling and the rater
    quick: bool = False  # a smaller, shorter chain for tests and CI
    sft_min_steps: int = 1500  # SFT runs at least this long, then until the no-carry signal (pglm/demo.py)
    sft_max_steps: int = 2000
    sft_lr: float = 1e-3
    sft_batch: int = 64
    signal_every: int = 50
    signal_threshold: float = 0.95
    pair_problems: int = 9500  # training problems sampled for pairs (all of them)
    samples_per_prompt: int = 4  # answers sampled per training problem (temperature 1); the first two distinct make its pair
    rater_accuracy: float = 0.8  # the rater prefers the better answer with this probability
    val_frac: float = 0.1  # share of the problems whose pairs are held out from the reward model's training
    rm_steps: int = 600
    rm_batch: int = 64  # pairs per step
    rm_lr: float = 3e-4
    rm_warmup: int = 20
    algo: str = "rloo"  # the KL goes into the reward (k1): max E[r] − β·KL, InstructGPT's objective
    beta: float = 0.5  # the KL coefficient of the run with KL (docs/rlhf.md: 1.0 gained less on every seed)
    rl_steps: int = 200  # each of the two policy-gradient runs
    rl_lr: float = 2e-4
    rl_warmup: int = 20
    rl_min_lr_frac: float = 0.1  # after the warm-up a cosine down to rl_lr × this (as pglm demo; docs/rlhf.md)
    prompts_per_step: int = 16
    group_size: int = 8
    eval_every: int = 10

    def __post_init__(self):
        if self.quick:  # the same chain, cut short
            self.sft_min_steps, self.sft_max_steps, self.signal_every, self.signal_threshold = 0, 100, 50, 0.9
            self.pair_problems, self.rm_steps, self.rl_steps = 1000, 60, 30


def better_answer(a: int, b: int, x: str, y: str) -> int:
    """+1 when x is closer to a + b than y, −1 when y is, 0 on a tie; an answer that is not a number
    is worse than any number."""
    def distance(ans: str) -> float:
        return abs(int(ans) - (a + b)) if ans.isdigit() else float("inf")

    dx, dy = distance(x), distance(y)
    return 0 if dx == dy else (1 if dx < dy else -1)


@torch.no_grad()
def sample_pairs(model, tokenizer, prompts: list[str], samples: int, rater_accuracy: float, seed: int) -> list[dict]:
    """One preference row per prompt whose `samples` sampled answers hold two distinct ones that the
    rater can tell apart: {"prompt", "chosen", "rejected", "rater_right"} (the rater's choice, and
    whether it was the truth's)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, len(prompts), 1024):
        chunk = prompts[i : i + 1024]
        _, texts = complete(model, tokenizer, chunk, get_task("add2").max_new_tokens, group_size=samples,
                            generator=gen)
        for j, prompt in enumerate(chunk):
            answers = texts[j * samples : (j + 1) * samples]
            second = next((x for x in answers[1:] if x != answers[0]), None)
            if second is None:
                continue
            better = better_answer(*parse_prompt(prompt), answers[0], second)
            if better == 0:
                continue
            good, bad = (answers[0], second) if better > 0 else (second, answers[0])
            right = random.Random(f"rater:{seed}:{prompt}").random() < rater_accuracy
            chosen, rejected = (good, bad) if right else (bad, good)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "rater_right": right})
    model.train()
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def train_reward_model(sft_model, tokenizer, cfg: RLHFConfig, prefs: Path, run_dir: Path, config: dict,
                       progress: bool) -> tuple[dict, list]:
    """Phase 3: the Bradley–Terry reward model, the SFT model with a scalar head, as `pglm reward`
    trains it, in a run directory of its own (RUN/reward). Returns its final validation figures, with
    the accuracy against the truth as `val_accuracy_vs_truth`, and the truth-labelled pairs."""
    context = sft_model.config.block_size
    train = read_preferences(str(prefs / "train.jsonl"), tokenizer, context)
    val = read_preferences(str(prefs / "val.jsonl"), tokenizer, context)
    truth_rows = [r if r["rater_right"] else {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                  for r in _read_jsonl(prefs / "val.jsonl")]
    write_jsonl(prefs / "val_truth.jsonl", truth_rows)
    truth = read_preferences(str(prefs / "val_truth.jsonl"), tokenizer, context)

    rm_cfg = TrainConfig(steps=cfg.rm_steps, batch_size=cfg.rm_batch, lr=cfg.rm_lr, warmup_steps=cfg.rm_warmup,
                         min_lr_frac=1.0, weight_decay=0.0, eval_every=max(cfg.rm_steps // 6, 1), ckpt_every=10**9,
                         log_every=10, seed=cfg.seed)
    run_dir.mkdir()
    tokenizer.save(run_dir / "tokenizer.json")
    write_json(run_dir / "config.json", {**config, "command": "reward", "train": asdict(rm_cfg),
                                         "data": {"src": str(prefs / "train.jsonl"), "val_src": str(prefs / "val.jsonl"),
                                                  "init": "the SFT model of this demo", "center_coef": 0.0}})
    rm = RewardModel(copy.deepcopy(sft_model))

    def batches(pairs):
        return [pair_batch(pairs[i : i + 256], tokenizer.pad_id) for i in range(0, len(pairs), 256)]

    val_batches, truth_batches = batches(val), batches(truth)

    def vs_truth(_):  # train_mle hands evaluators the language model; the pairs need its head too
        return {"val_accuracy_vs_truth": evaluate_pairs(rm, truth_batches)["val_accuracy"]}

    def get_batch(rng):
        return pair_batch([train[i] for i in rng.integers(0, len(train), cfg.rm_batch)], tokenizer.pad_id)

    metrics = MetricsLog(run_dir)
    final = train_mle(rm, make_optimizer(rm, rm_cfg), rm_cfg, get_batch, lambda n: val_batches, run_dir,
                      metrics=metrics, progress=progress, evaluator=vs_truth, step_fn=reward_step,
                      validate=evaluate_pairs)
    write_json(run_dir / "summary.json", {"command": "reward", "steps": rm_cfg.steps,  # as pglm reward writes it
                                          "wall_time_s": round(metrics.elapsed(), 2), **final})
    metrics.close()
    return {**final, "train_pairs": len(train)}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rlhf_run(sft_model, tokenizer, cfg: RLHFConfig, beta: float, proxy, run_dir: Path, config: dict,
             progress: bool) -> tuple[list[dict], torch.nn.Module]:
    """Phase 4: policy gradient from the SFT model against the reward model `proxy`, with KL coefficient
    `beta`; returns its evaluations [{step, accuracy, ..., proxy}] on the held-out problems, and the
    tuned policy."""
    task = get_task("add2")
    heldout = task.heldout()
    prompts = [r["prompt"] for r in heldout]

    def evaluate(m):  # the truth and the proxy of the same greedy answers
        texts = greedy_texts(m, tokenizer, prompts)
        scores = proxy(prompts, texts)
        return {**carry_figures(heldout, [t.strip() for t in texts]), "proxy": sum(scores) / len(scores)}

    run_dir.mkdir()
    tokenizer.save(run_dir / "tokenizer.json")
    write_json(run_dir / "config.json", {**config, "command": "demo-rlhf-rl", "beta": beta})
    policy = copy.deepcopy(sft_model)
    preset = get_preset(cfg.algo)
    rl_cfg = RLConfig(algo=cfg.algo, steps=cfg.rl_steps, prompts_per_step=cfg.prompts_per_step,
                      group_size=cfg.group_size, lr=cfg.rl_lr, warmup_steps=cfg.rl_warmup, beta=beta,
                      min_lr_frac=cfg.rl_min_lr_frac,
                      eval_every=cfg.eval_every, ckpt_every=10**9, seed=cfg.seed)
    print(f"  {describe(preset, beta, cfg.group_size, task.max_new_tokens)}")
    metrics = MetricsLog(run_dir)
    value_head = ValueHead(policy.config.d_model) if preset.estimator.values else None  # PPO's critic
    train_rl(policy, tokenizer, preset, rl_cfg, task_rows(task, cfg.seed, cfg.prompts_per_step), proxy, evaluate,
             task.max_new_tokens, run_dir, make_rl_optimizer(policy, value_head, cfg.rl_lr, rl_cfg),
             value_head=value_head, ref_model=frozen_copy(sft_model) if beta > 0 else None, metrics=metrics,
             progress=progress)
    metrics.close()
    keys = ("accuracy", "accuracy_carry", "accuracy_no_carry", "teacher_mistake_on_carry", "proxy")
    curve = [{"step": r["step"], **{k: r[k] for k in keys}} for r in read_metrics(run_dir / "metrics.jsonl")
             if r.get("phase") == "eval" and "proxy" in r]
    return curve, policy


def run_rlhf_demo(cfg: RLHFConfig, out: Path, progress: bool = True) -> dict:
    task = get_task("add2")
    model, tok, config, metrics = start_demo(cfg, out, "demo-rlhf")
    teacher = Teacher(tok, cfg.flaw_rate, cfg.seed, cfg.sft_batch)
    print(f"demo --rlhf: add2 with a teacher that drops the carry in {cfg.flaw_rate:.0%} of carry problems, a rater "
          f"right {cfg.rater_accuracy:.0%} of the time; {cfg.model} with {config['n_params']:,} parameters → {out}")
    times = {}

    print("1. SFT: maximum likelihood on the teacher's solutions")
    t0 = time.perf_counter()
    k, _, _ = imitate_teacher(model, teacher, out, metrics, seed=cfg.seed, min_steps=cfg.sft_min_steps,
                              max_steps=cfg.sft_max_steps, lr=cfg.sft_lr, signal_every=cfg.signal_every,
                              signal_threshold=cfg.signal_threshold, progress=progress, heldout_every=10**9)
    metrics.close()
    times["sft"] = time.perf_counter() - t0
    after_sft = carry_report(model, tok, task.heldout())

    print(f"2. preference pairs: {cfg.samples_per_prompt} sampled answers per training problem, "
          f"a rater right {cfg.rater_accuracy:.0%} of the time")
    t0 = time.perf_counter()
    prompts = [prompt_of(a, b) for a, b in TRAIN_PAIRS]  # the 9,500 training problems
    random.Random(f"split:{cfg.seed}").shuffle(prompts)
    prompts = prompts[: cfg.pair_problems]
    n_val = int(len(prompts) * cfg.val_frac)
    prefs = out / "prefs"
    pairs = {}
    for split, part in (("val", prompts[:n_val]), ("train", prompts[n_val:])):
        pairs[split] = sample_pairs(model, tok, part, cfg.samples_per_prompt, cfg.rater_accuracy,
                                    cfg.seed * 2 + (split == "val"))
        write_jsonl(prefs / f"{split}.jsonl", pairs[split])
    times["pairs"] = time.perf_counter() - t0
    pair_stats = {"train_pairs": len(pairs["train"]), "val_pairs": len(pairs["val"]),
                  "rater_right": sum(r["rater_right"] for r in pairs["train"]) / max(len(pairs["train"]), 1)}

    print(f"3. reward model: Bradley–Terry on {len(pairs['train']):,} pairs")
    t0 = time.perf_counter()
    rm_figures = train_reward_model(model, tok, cfg, prefs, out / "reward", config, progress)
    times["reward_model"] = time.perf_counter() - t0
    proxy = reward_model(str(out / "reward"))

    runs, policies = {}, {"sft": model}
    for name, beta in (("rl-kl", cfg.beta), ("rl-no-kl", 0.0)):
        print(f"4. policy gradient against the reward model, {f'β = {beta:g}' if beta else 'no KL'} ({out / name})")
        t0 = time.perf_counter()
        curve, policies[name] = rlhf_run(model, tok, cfg, beta, proxy, out / name, config, progress)
        runs[name] = {"beta": beta, "curve": curve}
        times[name] = time.perf_counter() - t0

    examples = []  # what each model answers to a few held-out carry problems, and what the reward model makes of it
    rows = [r for r in task.heldout() if has_carry(*parse_prompt(r["prompt"]))][:6]
    prompts = [r["prompt"] for r in rows]
    answers = {name: greedy_texts(m, tok, prompts) for name, m in policies.items()}
    scores = {name: proxy(prompts, texts) for name, texts in answers.items()}
    for i, r in enumerate(rows):
        examples.append({"prompt": r["prompt"], "answer": r["answer"],
                         **{name: {"answer": answers[name][i].strip(), "proxy": round(scores[name][i], 3)}
                            for name in policies}})

    summary = {
        "seed": cfg.seed, "flaw_rate": cfg.flaw_rate, "rater_accuracy": cfg.rater_accuracy, "model": cfg.model,
        "algo": cfg.algo, "sft_steps": k, "rm_steps": cfg.rm_steps, "rl_steps": cfg.rl_steps,
        "after_sft": after_sft, "pairs": pair_stats,
        "reward_model": {k_: rm_figures[k_] for k_ in ("val_accuracy", "val_accuracy_vs_truth", "val_margin",
                                                       "val_loss", "train_pairs") if k_ in rm_figures},
        "rl": {name: {"beta": r["beta"], "final": r["curve"][-1], "best_true": max(r["curve"], key=lambda e: e["accuracy"]),
                      "curve": r["curve"]} for name, r in runs.items()},
        "examples": examples, "wall_time_s": {k_: round(v, 1) for k_, v in times.items()},
    }
    write_json(out / "summary.json", summary)
    return summary
