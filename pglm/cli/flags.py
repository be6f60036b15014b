"""Flag groups shared by several verbs, and turning them into configs and tokenizers."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from pglm.errors import UserError


def add_tokenizer_flags(p):
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", help="char | word | bpe | hf:PATH (a tokenizer.json or a directory holding one); "
                   "default char, or the model's own with --model hf:PATH")
    g.add_argument("--vocab-size", type=int, help="bpe: vocabulary size to train (default 4096); char/word: keep the most frequent")
    g.add_argument("--zh", action="store_true", help="word: segment Chinese with jieba (pip install 'pglm[zh]')")
    g.add_argument(
        "--lower", action="store_true",
        help="word: lower-case the text. Off by default: it changes the language being modelled",
    )
    g.add_argument(
        "--stopwords", metavar="FILE",
        help="word: drop the words listed in FILE (one per line). Off by default: it changes the language being modelled",
    )
    g.add_argument("--min-freq", type=int, default=1, help="word: drop words seen fewer times (default 1)")


def add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt", help="gpt (Llama-style Transformer) | lstm | hf:PATH (a Hugging Face "
                   "causal LM: a local directory, or a hub id where there is network)")
    g.add_argument("--size", default="tiny", help="named size: tiny | small | medium (default tiny)")
    g.add_argument("--n-layer", type=int, help="override: number of layers")
    g.add_argument("--d-model", type=int, help="override: width (LSTM hidden size)")
    g.add_argument("--n-head", type=int, help="override: attention heads (gpt)")
    g.add_argument("--block-size", type=int, help="override: context length trained on")
    g.add_argument("--dropout", type=float, help="override: dropout rate")
    g.add_argument("--no-tie-embeddings", action="store_true", help="separate input and output embeddings")
    add_hf_flags(g)


def add_hf_flags(g):
    """Flags for hf: models: remote code, and LoRA through peft."""
    g.add_argument("--trust-remote-code", action="store_true",
                   help="hf: allow a model that ships its own Python code to run it (off by default)")
    g.add_argument("--lora-r", type=int, help="hf: train LoRA adapters of this rank instead of every weight")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="hf: LoRA scale α (default 16)")
    g.add_argument("--lora-targets", help="hf: comma-separated module names to adapt, e.g. q_proj,v_proj "
                   "(default: peft's choice for the model type)")


def lora_targets(args) -> list[str] | None:
    return [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None


def hf_model_from(args):
    """--model hf:PATH → LoadedRun (model and its tokenizer), with LoRA when --lora-r asks for it."""
    from pglm.runs import load_run

    if args.tokenizer:
        raise UserError("a hf: model brings its own tokenizer; drop --tokenizer")
    loaded = load_run(args.model, trust_remote_code=args.trust_remote_code, block_size=args.block_size)
    apply_lora(args, loaded.model)
    return loaded


def apply_lora(args, model) -> None:
    if not args.lora_r:
        return
    if model.config.arch != "hf":
        raise UserError("--lora-r applies to hf: models; a pglm gpt or lstm trains all its weights")
    from pglm.models.hf import add_lora

    add_lora(model, args.lora_r, args.lora_alpha, lora_targets(args))


def add_train_flags(p):
    from pglm.train.mle import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="optimizer steps in all")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default min(100, steps/10))")
    g.add_argument("--min-lr-frac", type=float, default=d.min_lr_frac, help="cosine ends at lr × this (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip, 0 = off (default 1.0)")
    add_safety_flags(g)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation tokens per periodic evaluation")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    add_ckpt_format_flag(g)
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (bf16 autocast on CUDA)")
    add_dist_flag(g)
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (pip install 'pglm[tb]')")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--out", required=True, help="run directory to write")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def add_safety_flags(g):
    g.add_argument("--skip-nonfinite", action="store_true", help="a step whose loss or gradient is not finite is "
                   "skipped and counted (metrics: skipped_steps) instead of stopping the run there")
    g.add_argument("--keep-checkpoints", type=int, help="keep only the newest K checkpoints (default 0: every one)")


def add_ckpt_format_flag(g):
    g.add_argument("--ckpt-format", help="full (default: the whole state, written by rank 0) | sharded (every rank "
                   "writes its own shards; for a model whose state does not fit one host); docs/distributed.md")


def add_dist_flag(g):
    g.add_argument("--dist", help="under torchrun: ddp (default: every rank holds the model) | fsdp2 (each rank "
                   "holds a shard of the weights, gradients and optimizer state); docs/distributed.md")


def train_config(args):
    from pglm.errors import check_number
    from pglm.train.mle import TrainConfig, check_config

    if args.steps is None or args.steps <= 0:
        raise UserError("--steps must be a positive number of optimizer steps, e.g. --steps 1000")
    if hasattr(args, "val_frac"):
        check_number("--val-frac", args.val_frac, 0, 1, low_open=True, example="0.05")
        if args.val_frac >= 1:
            raise UserError("--val-frac must be below 1: some of the text must be left to train on")
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    check_config(cfg)
    return cfg


def model_config_from(args, vocab_size: int):
    from pglm.models import model_config

    if args.lora_r:
        raise UserError("--lora-r applies to hf: models; a pglm gpt or lstm trains all its weights")
    return model_config(
        args.model, args.size, vocab_size=vocab_size, n_layer=args.n_layer, d_model=args.d_model,
        n_head=args.n_head, block_size=args.block_size, dropout=args.dropout,
        tie_embeddings=False if args.no_tie_embeddings else None,
    )


def build_tokenizer(args, texts):
    from pglm.tokenizers import hf_tokenizer, train_tokenizer

    spec = args.tokenizer or "char"
    if spec.startswith("hf:"):
        return hf_tokenizer(spec[3:])
    stopwords = None
    if args.stopwords:
        try:
            stopwords = Path(args.stopwords).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--stopwords {args.stopwords} cannot be read ({e}); pass a UTF-8 word list") from None
    return train_tokenizer(
        spec, texts, vocab_size=args.vocab_size, zh=args.zh, lower=args.lower, stopwords=stopwords,
        min_freq=args.min_freq,
    )




def add_sampling_flags(p):
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with probability ≥ p")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when TEXT is generated (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def check_sampling_args(args):
    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    if args.top_k is not None and args.top_k <= 0:
        raise UserError("--top-k must be a positive number of tokens")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")


# ---- resuming: the run's settings hold, unless a flag may change without changing the trajectory ----

# Flags a resume honours: where and how the run is watched and kept, not what it computes.
HONOURED_ON_RESUME = {"steps", "device", "quiet", "keep_checkpoints", "skip_nonfinite", "ckpt_every", "eval_every",
                      "log_every", "eval_tokens", "eval_samples", "eval_limit", "reward_timeout", "tensorboard"}
# Flags of the command itself, not of the run.
RUN_CONTROL = {"out", "resume", "overwrite", "dist", "trust_remote_code", "ref_offload", "command", "func"}


def given_flags(parser, argv: list[str]) -> set[str]:
    """The dests of the options written on the command line (defaults not counted), as argparse
    resolves them, unique prefixes included."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    command = next((t for t in argv if not t.startswith("-")), None)
    p = sub.choices.get(command)
    if p is None:
        return set()
    options = p._option_string_actions  # noqa: SLF001 (argparse keeps the map of option strings here)
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        action = options.get(name)
        if action is None:
            matches = {a for o, a in options.items() if o.startswith(name)}
            action = matches.pop() if len(matches) == 1 else None
        if action is not None:
            given.add(action.dest)
    return given


def resumed_config(cls, saved: dict, args, out, step: int):
    """The config of a run resumed at `step`: the saved one, with the flags given now that a resume
    honours (HONOURED_ON_RESUME); any other flag that would change the run is refused by name, as is
    --steps that does not go beyond `step`."""
    cfg = cls(**saved)
    names = {f.name for f in fields(cls)}
    given = getattr(args, "given", set())
    refused = []
    for name in sorted(given - RUN_CONTROL):
        new = getattr(args, name, None)
        if name in names and (new is None or new == getattr(cfg, name)):
            continue  # the run's own value, written again
        if name in HONOURED_ON_RESUME:
            setattr(cfg, name, new)
        elif name in names:
            refused.append(f"--{name.replace('_', '-')} {new} (the run's: {getattr(cfg, name)})")
        else:
            refused.append(f"--{name.replace('_', '-')} (part of the run's set-up)")
    if refused:
        raise UserError(f"--resume continues {out} with its own settings, but {'; '.join(refused)} would change "
                        "what it computes: drop it, or start a new run in another --out")
    if cfg.steps < step or (cfg.steps == step and "steps" in given):
        raise UserError(f"--steps {cfg.steps}: {out} has already reached step {step}; pass a larger --steps "
                        "to train longer")
    if cfg.steps == step and (Path(out) / "summary.json").is_file():  # without it: stopped while finishing
        raise UserError(f"{out} is finished (step {step} of {cfg.steps}); pass --steps N above {step} to train "
                        "it longer")
    return cfg
