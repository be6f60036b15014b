"""The `pglm` command. Thin: each verb parses its flags and calls the library in recipe order.

Verbs live by stage: train.py (prepare, pretrain, sft), reward.py (reward), rl.py (rl), apply.py (eval, generate, chat,
plot); flags.py holds the flag groups they share.

Exit codes (docs/design.md): 0 success, 2 a user error (one line on stderr naming the problem and the
fix, no traceback), 1 an internal error, 130 interrupted by Ctrl-C (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pglm import __version__
from pglm.cli.apply import cmd_chat, cmd_eval, cmd_export, cmd_generate, cmd_plot
from pglm.cli.demo import cmd_demo
from pglm.cli.flags import (
    add_ckpt_format_flag,
    add_dist_flag,
    add_hf_flags,
    add_model_flags,
    add_safety_flags,
    add_sampling_flags,
    add_tokenizer_flags,
    add_train_flags,
    given_flags,
)
from pglm.cli.reward import cmd_reward
from pglm.cli.rl import cmd_rl
from pglm.cli.train import cmd_prepare, cmd_pretrain, cmd_sft
from pglm.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")




def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pglm", description="Policy-gradient language models: from raw text to a model tuned by policy gradient.")
    parser.add_argument("--version", action="version", version=f"pglm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="VERB")

    p = sub.add_parser("demo", help="the whole chain on add2: policy gradient goes beyond its teacher (--rlhf: from a learned reward)",
                       description="Maximum likelihood on solutions from a flawed teacher, then policy gradient with the "
                       "true reward, against maximum likelihood alone; evaluated on 500 held-out problems. With --rlhf: "
                       "SFT, preference pairs from a noisy rater, a reward model, and policy gradient against it with "
                       "and without KL, the true accuracy measured beside the reward model's score (docs/rlhf.md).")
    p.add_argument("--rlhf", action="store_true", help="the RLHF chain: a learned reward model in place of the true reward")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter chain (under a minute; for tests and CI)")
    p.add_argument("--algo", default=None, help="policy-gradient preset (default grpo; with --rlhf rloo)")
    p.add_argument("--model", default="gpt", help="gpt (2 layers × 128) or lstm (1 layer × 256)")
    p.add_argument("--flaw-rate", type=float, default=0.7, help="share of carry problems the teacher gets wrong (default 0.7)")
    p.add_argument("--rater-accuracy", type=float, default=0.8,
                   help="with --rlhf: how often the rater prefers the better answer (default 0.8)")
    p.add_argument("--out", default=None, help="run directory to write (default runs/demo; with --rlhf runs/demo-rlhf)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    def data_flags(p, what="SRC: a text file, a glob, a JSONL file with a text field, or builtin:python-docs"):
        p.add_argument("--data", help=what + " (required unless --resume)")
        p.add_argument("--val-data", help="validation data (default: the last --val-frac of --data)")
        p.add_argument("--val-frac", type=float, default=0.1, help="share held out for validation (default 0.1)")
        p.add_argument("--text-field", default="text", help="JSONL field that holds the text (default 'text')")

    p = sub.add_parser("prepare", help="tokenise a corpus into token files", description="Tokenise a corpus into OUT/train.bin and OUT/val.bin.")
    data_flags(p)
    add_tokenizer_flags(p)
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train a language model by maximum likelihood on raw text",
                       description="Train a GPT or LSTM language model by maximum likelihood on raw text.")
    data_flags(p)
    add_tokenizer_flags(p)
    add_model_flags(p)
    add_train_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/completion JSONL",
                       description="Maximum likelihood on the completions of prompt/completion JSONL (the loss skips prompt tokens).")
    data_flags(p, "FILE.jsonl with 'prompt' and 'completion' fields")
    p.add_argument("--task", help="instead of --data: solved problems of a built-in task (add2, reverse, sort_digits)")
    p.add_argument("--init", help="start from this run or checkpoint (its model and tokenizer), or hf:PATH")
    add_tokenizer_flags(p)
    add_model_flags(p)
    add_train_flags(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("reward", help="train a reward model on preference pairs (Bradley-Terry)",
                       description="Train a reward model: a language model with a scalar head, by maximum likelihood "
                       "of preference pairs (-log sigmoid(r_chosen - r_rejected - margin)); docs/reward.md.")
    p.add_argument("--data", help="PREFS.jsonl: rows with 'prompt', 'chosen', 'rejected' (text or chat messages), "
                   "optional 'margin' (required unless --resume)")
    p.add_argument("--val-data", help="held-out pairs (default: the last --val-frac of --data)")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of pairs held out (default 0.1)")
    p.add_argument("--init", help="the language model to start from: a run or checkpoint, or hf:PATH")
    p.add_argument("--center-coef", type=float, default=0.0, help="weight of the centring term η (r_c + r_r)^2 "
                   "(TRL's center_rewards_coefficient; default 0: off)")
    add_hf_flags(p.add_argument_group("hf: models"))
    add_train_flags(p)
    p.set_defaults(func=cmd_reward, model="gpt", tokenizer=None, block_size=None)

    from pglm.pg.presets import PRESETS
    from pglm.train.rl import RLConfig

    d = RLConfig()
    p = sub.add_parser("rl", help="tune a model by policy gradient against a reward",
                       description="Tune a model by policy gradient: maximise the expected reward of its samples.")
    p.add_argument("--init", help="the run or checkpoint to start from (its model and tokenizer), or hf:PATH")
    p.add_argument("--task", help="a built-in task: add2 | reverse | sort_digits")
    p.add_argument("--prompts", help="instead of --task: JSONL with a 'prompt' field; other fields reach the reward")
    p.add_argument("--reward", action="append", help="module:function, path/to/file.py:function or rm:DIR; with --task "
                   "it replaces the task's reward (the held-out evaluation stays the task's) "
                   "(repeatable; builtin:exact_match, builtin:numeric_match, builtin:chrf, builtin:bleu)")
    p.add_argument("--reward-weight", action="append", type=float, help="weight of each --reward, in order")
    p.add_argument("--reward-norm", action="store_true", help="normalise rewards by their running mean and "
                   "standard deviation (off by default; for learned rewards, whose scale is arbitrary)")
    p.add_argument("--reward-clip", type=float, help="clip rewards (after --reward-norm) to [-C, C] (default 0: off)")
    p.add_argument("--reward-timeout", type=float, help=f"seconds one reward call may take before the run stops "
                   f"with an error (default {d.reward_timeout:g}; 0: no limit)")
    p.add_argument("--rollout-engine", help="what samples the rollouts: torch (pglm's sampler, the default) | vllm "
                   "(pip install -e '.[vllm]'; docs/vllm.md)")
    p.add_argument("--rollout-correction", help="with --rollout-engine vllm: none | token_tis (default: min(π_train/"
                   "π_engine, C) per token) | seq_mask (sequences whose ratio exceeds C leave the loss)")
    p.add_argument("--rollout-correction-cap", type=float, help=f"C of --rollout-correction (default {d.rollout_correction_cap:g})")
    p.add_argument("--algo", default=d.algo, help=f"{' | '.join(PRESETS)} (default {d.algo})")
    p.add_argument("--steps", type=int, help=f"rollouts, one or more optimizer steps each (default {d.steps})")
    p.add_argument("--group-size", type=int, help=f"samples per prompt (default {d.group_size})")
    p.add_argument("--prompts-per-step", type=int, help=f"prompts per rollout (default {d.prompts_per_step})")
    p.add_argument("--lr", type=float, help="learning rate (default: the algorithm's, see docs/rl.md)")
    p.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default {d.warmup_steps})")
    p.add_argument("--min-lr-frac", type=float, help="after the warm-up, cosine decay to lr × this at the last "
                   "step (default 1: constant)")
    p.add_argument("--beta", type=float, help="KL coefficient to the initial model; 0 = no reference (default 0)")
    add_safety_flags(p)
    p.add_argument("--ref-offload", action="store_true", help="--dist fsdp2: keep the reference model's shards "
                   "in CPU memory between uses (less GPU memory, one copy in per rollout)")
    p.add_argument("--epochs", type=int, help="passes over each rollout (default 1)")
    p.add_argument("--minibatches", type=int, help="optimizer steps per pass (default 1)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="refused: rollouts sample the whole distribution (docs/rl.md)")
    p.add_argument("--top-p", type=float, help="refused: rollouts sample the whole distribution (docs/rl.md)")
    p.add_argument("--max-new-tokens", type=int, help="longest completion (default: the task's; with --prompts 256, or what the model's context leaves)")
    p.add_argument("--truncation", help="responses without eos: keep | mask | penalise (default: the algorithm's)")
    p.add_argument("--eval-every", type=int, help=f"steps between held-out evaluations (default {d.eval_every})")
    p.add_argument("--eval-samples", type=int, help=f"samples per held-out problem for pass@k (default {d.eval_samples})")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out problems (default all)")
    p.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default {d.ckpt_every})")
    add_ckpt_format_flag(p)
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward (gradient accumulation "
                   "inside a minibatch; default: the whole minibatch)")
    p.add_argument("--rollout-batch-size", type=int, help="sequences generated at once, whole groups "
                   "(default: the whole rollout)")
    p.add_argument("--device", help="auto | cpu | cuda")
    add_dist_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    add_hf_flags(p.add_argument_group("hf: models"))
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("eval", help="loss, perplexity and next-token accuracy on a file",
                       description="Validation loss, perplexity and next-token accuracy of a checkpoint on a file.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoints/step_N")
    p.add_argument("--data", help="text file, glob, JSONL with a text field, prompt/completion JSONL, or builtin:python-docs")
    p.add_argument("--task", help="instead of --data: greedy accuracy and pass@k on a built-in task's held-out problems")
    p.add_argument("--samples", type=int, default=8, help="--task: samples per problem for pass@k (default 8; 0 = greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="--task: sampling temperature for pass@k (default 1.0)")
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text (default 'text')")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch (default 16)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="a run whose hf: model ships its own Python code: allow it to run (off by default)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint", description="Sample continuations of a prompt.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoints/step_N")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw, as one batch (default 1)")
    add_sampling_flags(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="a run whose hf: model ships its own Python code: allow it to run (off by default)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="type text, the model continues it", description="Interactive sampling from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoints/step_N")
    add_sampling_flags(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="a run whose hf: model ships its own Python code: allow it to run (off by default)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("plot", help="draw the curves of a run", description="Draw RUN/plots/*.png from RUN/metrics.jsonl.")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                       description="Write a gpt checkpoint as a LlamaForCausalLM directory (config, safetensors "
                       "weights, tokenizer) that transformers loads as it is.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoints/step_N")
    p.add_argument("--format", default="hf", help="output format; only hf (a Hugging Face model directory)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--merge-lora", action="store_true", help="hf:... runs: merge LoRA adapters into the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="a run whose hf: model ships its own Python code: allow it to run (off by default)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed as one line)
        return int(e.code or 0)
    args.given = given_flags(parser, argv)  # what --resume may honour or must refuse
    from pglm import dist
    from pglm.dist import SharedUserError
    from pglm.train.mle import stop_signals_raise

    try:
        with stop_signals_raise():
            args.func(args)
        return 0
    except UserError as e:
        # With several processes rank 0 says what every rank agreed on; another rank speaks only of
        # an error of its own.
        if dist.is_main():
            print(f"pglm {args.command}: error: {e}", file=sys.stderr)
        elif not isinstance(e, SharedUserError):
            print(f"pglm {args.command}: error (rank {dist.rank()}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not dist.is_main():
            return 130
        out = getattr(args, "out", None)
        if args.command == "demo":
            pass  # cmd_demo has said what was saved and how to go on
        elif args.command in ("pretrain", "sft", "rl", "reward") and out and (Path(out) / "checkpoints" / "latest").is_file():
            latest = (Path(out) / "checkpoints" / "latest").read_text().strip()
            print(f"\ninterrupted: {out}/checkpoints/{latest} is saved; continue with: pglm {args.command} --out {out} --resume",
                  file=sys.stderr)
        elif args.command in ("pretrain", "sft", "rl", "reward", "prepare") and out and not getattr(args, "resume", False):
            print(f"\ninterrupted before the first checkpoint: nothing was kept in {out}; run the same command "
                  "again to start over", file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
