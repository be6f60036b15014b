"""GRPO on add2, pglm against TRL's GRPOTrainer, from the very same Hugging Face checkpoint.

    python benchmarks/rl_vs_trl.py [--steps 30] [--repeats 4] [--best-steps 200] [--work runs/bench-rl]

1. A GPT-2-configured model (4 layers, 4 heads, width 128, 64 positions, dropout 0, tied embeddings)
   is trained once by maximum likelihood on add2's training pairs (plain PyTorch loop: AdamW 1e-3,
   batch 64, constant rate, fp32) until its greedy accuracy on the 500 held-out problems is 30–60 %
   (the first evaluation, every 10 steps from step 400, in that range; the transition is steep), and
   saved in Hugging Face format with its tokenizer (<pad>=0 <bos>=1 <eos>=2, digits 3..12, + 13,
   = 14; <bos> before every prompt), as in the add2 reference of docs/design.md. Reused from --work if there.
2. Interleaved (TRL, pglm, TRL, pglm, ...), `--repeats` times, each a fresh run of `--steps` steps from
   that checkpoint with matched settings: 8 prompts × 8 completions, at most 4 new tokens,
   temperature 1, fp32, constant learning rate `--lr`, no KL (β = 0), one update per batch. Reported:
   median seconds per step (the first two steps of each run left out as warm-up), completions per
   second, greedy accuracy on the held-out problems after the run, and the ratios. TRL runs with its
   default loss (`dapo`, group-scaled rewards); pglm with `--algo grpo`; the loss changes no timing.
3. pglm's best setting for the task (`--best-algo`, `--best-lr`, `--best-prompts`), `--best-steps`
   steps × 64 completions from the same checkpoint, over `--best-seeds` seeds: greedy accuracy (TRL's
   best: 0.73 after 200, mean of 3 seeds). The best spends its 64 completions on 64 prompts × 1 sample
   (REINFORCE with a moving baseline needs no group), not 8 × 8: see docs/benchmarks.md. Then TRL's
   best setting of the reference (lr 1e-4, β = 0) for as many steps and seeds. For scale,
   maximum likelihood on the correct answers of as many problems (200 × 64) from the same checkpoint.

Greedy accuracy of both is measured by the same code (pglm.evaluate.evaluate_task, exact match of the
answer, batched greedy decoding with per-row positions) on the same 500 problems.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment_line, matmul_gflops  # noqa: E402

from pglm.cli import main as pglm_main  # noqa: E402
from pglm.evaluate import evaluate_task  # noqa: E402
from pglm.models.hf import load_hf, wrap_hf  # noqa: E402
from pglm.runs import load_run  # noqa: E402
from pglm.tasks import get_task  # noqa: E402

TASK = get_task("add2")


def accuracy(hf_model, tokenizer) -> float:
    """Greedy accuracy on the 500 held-out problems, through pglm's evaluator."""
    model = wrap_hf(hf_model)
    was_training = hf_model.training
    hf_model.eval()
    acc = evaluate_task(model, tokenizer, TASK, samples=0)["accuracy"]
    hf_model.train(was_training)
    return acc


def breakdown(model) -> dict[str, str]:
    """Greedy accuracy on the held-out problems with and without a one-digit operand (3+45, 72+8)."""
    from pglm.sampling import complete
    from pglm.tasks.add2 import HELDOUT_PAIRS

    _, texts = complete(model, TASK.tokenizer(), [f"{a}+{b}=" for a, b in HELDOUT_PAIRS], 4, greedy=True)
    right = {"a one-digit operand": [], "two two-digit operands": []}
    for (a, b), text in zip(HELDOUT_PAIRS, texts):
        right["a one-digit operand" if min(a, b) < 10 else "two two-digit operands"].append(text.strip() == str(a + b))
    return {k: f"{sum(v) / len(v):.3f} of {len(v)} problems" for k, v in right.items()}


# ---- 1. the shared checkpoint ----


def plain_mle_step(model, opt, rows: list[dict], answer_only: bool = False) -> torch.Tensor:
    """One step of the plain loop: teacher forcing on <bos> a+b=c <eos> for every row, AdamW. The loss
    covers every token, as the reference's loop does, or with `answer_only` only c <eos> (as `pglm sft`)."""
    from pglm.data import sft_batch, sft_example

    tok = TASK.tokenizer()
    b = sft_batch([sft_example(tok, r["prompt"], TASK.solution(r), 64) for r in rows], tok.pad_id)
    logits = model(b.x).logits  # right-padded rows: positions arange(T) are right
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.y.flatten(), reduction="none")
    counted = (b.mask if answer_only else b.x != tok.pad_id).float()  # (B, T)
    loss = (loss * counted.flatten()).sum() / counted.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def mle_on_truth(ckpt: Path, steps: int, lr: float, one_digit_share: float | None = None,
                 answer_only: bool = False):
    """What the same number of examples gives when every one is a correct answer: `steps` more steps of
    the plain loop (64 fresh training problems each, fresh AdamW at `lr`) from the shared checkpoint.
    Problems are drawn as add2 draws them, or with a one-digit operand at `one_digit_share` of the rows
    (benchmarks/add2_ceiling.py); `answer_only` as in plain_mle_step."""
    from transformers import GPT2LMHeadModel

    from pglm.tasks.add2 import TRAIN_PAIRS, prompt_of

    one = [p for p in TRAIN_PAIRS if min(p) < 10]  # 1,816 of the 9,500 training pairs (19 %)
    two = [p for p in TRAIN_PAIRS if min(p) >= 10]
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(ckpt, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(1)
    for _ in range(steps):
        if one_digit_share is None:
            rows = TASK.train_prompts(rng, 64)
        else:
            rows = [TASK.row(prompt_of(*rng.choice(one if rng.random() < one_digit_share else two))) for _ in range(64)]
        plain_mle_step(model, opt, rows, answer_only=answer_only)
    return model


def make_checkpoint(work: Path, lo: float = 0.3, hi: float = 0.6) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from pglm.export import hf_tokenizer

    ckpt = work / "ckpt"
    if (ckpt / "config.json").is_file():
        return ckpt
    tok = TASK.tokenizer()  # pglm's add2 alphabet: exactly the ids above
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_id,
                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    t0 = time.perf_counter()
    for step in range(1, 2001):
        loss = plain_mle_step(model, opt, TASK.train_prompts(rng, 64))
        if step >= 400 and step % 10 == 0:
            acc = accuracy(model, tok)
            print(f"  MLE step {step}: loss {loss.item():.3f}, greedy accuracy {acc:.3f}", flush=True)
            if lo <= acc <= hi:
                break
            if acc > hi:
                raise SystemExit(f"accuracy jumped past {hi} at step {step}; rerun with another seed or range")
    model.save_pretrained(ckpt)
    hf_tokenizer(tok, 64).save_pretrained(ckpt)
    (ckpt / "mle.json").write_text(json.dumps({"steps": step, "accuracy": acc, "seconds": time.perf_counter() - t0}))
    return ckpt


# ---- 2. one run of each ----


def run_trl(ckpt: Path, steps: int, lr: float, out: Path, seed: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(ckpt)
    rows = TASK.train_prompts(random.Random(seed), 8 * steps)  # as many prompts as the run uses
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **kw):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=64, num_generations=8,
        max_completion_length=4, temperature=1.0, beta=0.0, learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, bf16=False, gradient_checkpointing=False, use_cpu=True, num_iterations=1,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_dropout=True, seed=seed,
    )
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[Clock()])
        t0 = time.perf_counter()
        trainer.train()
    step_times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]
    return {"step_s": statistics.median(step_times[2:]), "accuracy": accuracy(trainer.model, TASK.tokenizer())}


def run_pglm(ckpt: Path, steps: int, lr: float, out: Path, seed: int, algo: str = "grpo", warmup: int = 1,
             prompts: int = 8, group: int = 8) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["rl", "--init", f"hf:{ckpt}", "--task", "add2", "--algo", algo, "--steps", str(steps),
            "--prompts-per-step", str(prompts), "--group-size", str(group), "--max-new-tokens", "4", "--temperature", "1",
            "--lr", str(lr), "--warmup-steps", str(warmup), "--beta", "0", "--eval-every", str(steps),
            "--eval-samples", "0", "--ckpt-every", str(steps), "--seed", str(seed), "--out", str(out), "--quiet"]
    if pglm_main(argv) != 0:
        raise SystemExit("pglm rl failed: " + " ".join(argv))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    step_times = [b["time"] - a["time"] for a, b in zip(rl, rl[1:])]  # from one logged step to the next
    acc = [r for r in rows if r["phase"] == "eval"][-1]["accuracy"]
    return {"step_s": statistics.median(step_times[2:]), "accuracy": acc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="steps per timed run (default 30)")
    p.add_argument("--repeats", type=int, default=4,
                   help="TRL/pglm pairs of runs (default 4: two pairs swung the ratio from 1.96× to 2.50× within "
                        "minutes on the 2-core machine; 0 = accuracy run only)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the timed runs (TRL's best: 1e-4)")
    p.add_argument("--best-algo", default="reinforce", help="pglm preset for the accuracy run (default reinforce)")
    p.add_argument("--best-lr", type=float, default=1e-4, help="its learning rate (default 1e-4)")
    p.add_argument("--best-warmup", type=int, default=10, help="its warm-up steps (default 10)")
    p.add_argument("--best-prompts", type=int, default=64,
                   help="its prompts per step (default 64: one sample each, 64 completions per step as TRL's 8 × 8)")
    p.add_argument("--best-seeds", type=int, default=3, help="seeds of the accuracy run, reported with their mean (default 3)")
    p.add_argument("--best-steps", type=int, default=200, help="steps of the accuracy run (0 = skip; default 200)")
    p.add_argument("--work", default="runs/bench-rl", help="where the checkpoint and runs go")
    args = p.parse_args()
    if args.best_prompts < 1 or 64 % args.best_prompts or args.best_seeds < 1:
        raise SystemExit("--best-prompts must divide 64 completions (1, 2, 4, ..., 64) and --best-seeds be at least 1")
    if (args.repeats and args.steps < 4) or 0 < args.best_steps < 4:
        raise SystemExit("--steps and --best-steps need at least 4 steps (the first two of a run are not timed)")
    import transformers

    transformers.logging.set_verbosity_error()  # its advice to pass attention_mask: right padding needs none here
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(environment_line())
    print(f"fp32 matmul: {matmul_gflops():.0f} GFLOP/s")
    ckpt = make_checkpoint(work)
    mle = json.loads((ckpt / "mle.json").read_text())
    start = accuracy(load_hf(f"hf:{ckpt}").inner, TASK.tokenizer())
    print(f"checkpoint {ckpt}: GPT-2 4×128, {mle['steps']} MLE steps, greedy accuracy {start:.3f}")

    if args.repeats:  # 0: only the accuracy run
        results: dict[str, list[dict]] = {"trl": [], "pglm": []}
        for r in range(args.repeats):
            for name, fn in (("trl", run_trl), ("pglm", run_pglm)):
                res = fn(ckpt, args.steps, args.lr, work / f"{name}-{r}", seed=r)
                results[name].append(res)
                print(f"  run {r} {name:4s}: {res['step_s'] * 1000:6.1f} ms/step, accuracy after {args.steps} steps "
                      f"{res['accuracy']:.3f}", flush=True)
        med = {k: statistics.median(x["step_s"] for x in v) for k, v in results.items()}
        acc = {k: statistics.mean(x["accuracy"] for x in v) for k, v in results.items()}
        print(f"\nGRPO step, 64 completions (median over {args.repeats} runs of {args.steps} steps each):")
        for k in ("trl", "pglm"):
            print(f"  {k:4s} {med[k] * 1000:6.1f} ms/step  {64 / med[k]:7.0f} completions/s  "
                  f"greedy accuracy after {args.steps} steps {acc[k]:.3f} (from {start:.3f})")
        ratio = med["trl"] / med["pglm"]
        # Each pair ran back to back, so its own ratio shows how far the machine's drift moves the figure.
        pairs = sorted(t["step_s"] / q["step_s"] for t, q in zip(results["trl"], results["pglm"]))
        print(f"pglm is {ratio:.2f}× faster per step than TRL GRPOTrainer (target ≥ 3×: {'met' if ratio >= 3 else 'MISSED'}); "
              f"ratio of each pair {pairs[0]:.2f}×–{pairs[-1]:.2f}×")

    if args.best_steps:
        t0 = time.perf_counter()
        group = 64 // args.best_prompts
        accs = [run_pglm(ckpt, args.best_steps, args.best_lr, work / f"pglm-best-{seed}", seed=seed, algo=args.best_algo,
                         warmup=args.best_warmup, prompts=args.best_prompts, group=group)["accuracy"]
                for seed in range(args.best_seeds)]
        mean = statistics.mean(accs)
        print(f"\npglm {args.best_algo} lr {args.best_lr:g} (warm-up {args.best_warmup}), {args.best_prompts} prompts × {group} "
              f"sample{'s' if group > 1 else ''} each, {args.best_steps} steps: greedy accuracy {mean:.3f}, mean of seeds "
              f"{', '.join(f'{a:.3f}' for a in accs)} (from {start:.3f}; TRL's best 0.73, mean of 3 seeds; target ≥ 0.90: "
              f"{'met' if mean >= 0.9 else 'MISSED'}) in {time.perf_counter() - t0:.0f} s")
        # TRL's best setting of the reference (lr 1e-4, β = 0) on this checkpoint, same steps and seeds
        trl = [run_trl(ckpt, args.best_steps, 1e-4, work / f"trl-best-{seed}", seed=seed)["accuracy"]
               for seed in range(args.best_seeds)]
        print(f"TRL GRPOTrainer lr 1e-4, 8 prompts × 8 samples, {args.best_steps} steps, same checkpoint: greedy accuracy "
              f"{statistics.mean(trl):.3f}, mean of seeds {', '.join(f'{a:.3f}' for a in trl)}")
        print("where seed 0's model still fails (greedy, held-out):")
        for name, acc in breakdown(load_run(work / "pglm-best-0", torch.device("cpu")).model).items():
            print(f"  {name}: {acc}")
        # The same number of examples, all of them correct answers: how far supervision itself gets.
        for lr in (1e-4, 3e-4):
            model = mle_on_truth(ckpt, args.best_steps, lr).eval()
            print(f"maximum likelihood on the correct answers instead, {args.best_steps} steps × 64 problems, AdamW {lr:g}: "
                  f"greedy accuracy {accuracy(model, TASK.tokenizer()):.3f}; "
                  + "; ".join(f"{k}: {v}" for k, v in breakdown(wrap_hf(model)).items()))


if __name__ == "__main__":
    main()
