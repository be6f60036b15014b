"""The `pglm` command. Thin: each verb parses its flags and calls the library in recipe order.

Exit codes (DESIGN.md): 0 success, 2 a user error (one line on stderr naming the problem and the
fix, no traceback), 1 an internal error, 130 interrupted by Ctrl-C (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from pglm import __version__
from pglm.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# Flag groups shared by several verbs


def _add_tokenizer_flags(p):
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default="char", help="char | word | bpe | hf:PATH (a tokenizer.json or a directory holding one)")
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


def _add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt", help="gpt (Llama-style Transformer) | lstm")
    g.add_argument("--size", default="tiny", help="named size: tiny | small | medium (default tiny)")
    g.add_argument("--n-layer", type=int, help="override: number of layers")
    g.add_argument("--d-model", type=int, help="override: width (LSTM hidden size)")
    g.add_argument("--n-head", type=int, help="override: attention heads (gpt)")
    g.add_argument("--block-size", type=int, help="override: context length trained on")
    g.add_argument("--dropout", type=float, help="override: dropout rate")
    g.add_argument("--no-tie-embeddings", action="store_true", help="separate input and output embeddings")


def _add_train_flags(p, steps_default=None):
    from pglm.train.mle import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps_default, help="optimizer steps in all")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default min(100, steps/10))")
    g.add_argument("--min-lr-frac", type=float, default=d.min_lr_frac, help="cosine ends at lr × this (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip, 0 = off (default 1.0)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation tokens per periodic evaluation")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (bf16 autocast on CUDA)")
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (pip install 'pglm[tb]')")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--out", required=True, help="run directory to write")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def _train_config(args):
    from pglm.train.mle import TrainConfig

    if args.steps is None or args.steps <= 0:
        raise UserError("--steps must be a positive number of optimizer steps, e.g. --steps 1000")
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _model_config(args, vocab_size: int):
    from pglm.models import model_config

    if args.model.startswith("hf:"):
        raise UserError("--model hf:PATH is not available in this version; use --model gpt or --model lstm")
    return model_config(
        args.model, args.size, vocab_size=vocab_size, n_layer=args.n_layer, d_model=args.d_model,
        n_head=args.n_head, block_size=args.block_size, dropout=args.dropout,
        tie_embeddings=False if args.no_tie_embeddings else None,
    )


def _build_tokenizer(args, texts):
    from pglm.tokenizers import hf_tokenizer, train_tokenizer

    spec = args.tokenizer
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


# ----------------------------------------------------------------------------------------------
# pglm prepare / pretrain / sft


def cmd_prepare(args):
    from pglm.data import iter_texts, prepare_corpus
    from pglm.train.checkpoint import prepare_out_dir

    out = prepare_out_dir(args.out, resume=False, overwrite=args.overwrite)
    tokenizer = _build_tokenizer(args, iter_texts(args.data, args.text_field))
    info = prepare_corpus(args.data, tokenizer, out, args.val_frac, args.val_data, args.text_field)
    tokenizer.save(out / "tokenizer.json")
    print(f"wrote {out}: {info.n_train:,} training and {info.n_val:,} validation tokens, vocabulary {tokenizer.vocab_size:,}")


def _start_run(args, command: str, prepare):
    """Create or resume a run directory; returns (out, run_config, tokenizer, model, optimizer, start_step, metrics).

    `prepare(out)` builds a new run's tokenizer, data and model config: (tokenizer, data_info, ModelConfig).
    """
    import torch

    from pglm.models import ModelConfig, build_model, count_params
    from pglm.runs import load_run
    from pglm.train.checkpoint import load_optimizer, prepare_out_dir, read_json, write_json
    from pglm.train.metrics import MetricsLog
    from pglm.train.mle import TrainConfig, make_optimizer, resolve_device

    existed = Path(args.out).exists()
    out = prepare_out_dir(args.out, args.resume, args.overwrite)
    if args.resume:
        config = read_json(out / "config.json")
        if config.get("command") != command:
            raise UserError(f"--resume: {out} is a '{config.get('command')}' run; resume it with pglm {config.get('command')}")
        train_cfg = TrainConfig(**config["train"])
        if args.steps is not None:  # the one setting a resume may change: train for longer
            train_cfg.steps = args.steps
            config["train"] = asdict(train_cfg)
        loaded = load_run(out)
        model, tokenizer = loaded.model, loaded.tokenizer
        state = read_json(loaded.ckpt_dir / "state.json")
        start_step = int(state["step"])
        device = resolve_device(train_cfg.device)
        model.to(device).train()
        optimizer = make_optimizer(model, train_cfg)
        load_optimizer(optimizer, loaded.ckpt_dir)
        metrics = MetricsLog(out, resume_step=start_step, elapsed=state.get("elapsed", 0.0), tensorboard=train_cfg.tensorboard)
        write_json(out / "config.json", config)
        print(f"resuming {out} at step {start_step} of {train_cfg.steps}", file=sys.stderr)
        return out, config, tokenizer, model, optimizer, start_step, metrics

    if not args.data and not getattr(args, "task", None):
        raise UserError(f"pglm {command} needs --data (or --resume to continue the run in --out)")
    train_cfg = _train_config(args)
    try:
        tokenizer, data_info, model_cfg, model = prepare(out)
        torch.manual_seed(train_cfg.seed)  # initialisation
        if model is None:
            model = build_model(model_cfg)
        device = resolve_device(train_cfg.device)
        model.to(device).train()
        config = {
            "pglm_version": __version__,
            "command": command,
            "model": asdict(model_cfg if model_cfg is not None else model.config),
            "train": asdict(train_cfg),
            "data": data_info,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
            "n_params": count_params(model),
        }
        tokenizer.save(out / "tokenizer.json")
        write_json(out / "config.json", config)
        optimizer = make_optimizer(model, train_cfg)
        metrics = MetricsLog(out, tensorboard=train_cfg.tensorboard)
    except BaseException:
        # a new run that failed before it started leaves no half-written directory behind
        import shutil

        for child in out.iterdir() if existed else [out]:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        raise
    cfg = ModelConfig(**config["model"])
    print(
        f"{command}: {cfg.arch} {config['n_params']:,} parameters ({cfg.n_layer} layers, width {cfg.d_model}, "
        f"context {cfg.block_size}), {tokenizer.kind} tokenizer with {tokenizer.vocab_size:,} tokens, "
        f"{train_cfg.steps} steps → {out}",
        file=sys.stderr,
    )
    return out, config, tokenizer, model, optimizer, 0, metrics


def _finish_run(out, config, final_eval, metrics, command):
    from pglm.plots import plot_run
    from pglm.train.checkpoint import write_json

    summary = {"command": command, "steps": config["train"]["steps"], "wall_time_s": round(metrics.elapsed(), 2),
               "n_params": config.get("n_params"), **final_eval}
    write_json(out / "summary.json", summary)
    metrics.close()
    plot_run(out)
    shown = {k: v for k, v in final_eval.items() if isinstance(v, float)}
    print("done: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()) + f"  → {out}")


def cmd_pretrain(args):
    import numpy as np

    from pglm.data import iter_texts, load_tokens, prepare_corpus, random_windows, sequential_windows
    from pglm.train.checkpoint import read_json
    from pglm.train.mle import train_mle

    def prepare(out):
        _model_config(args, vocab_size=1)  # a bad model flag is reported before the data is read
        tokenizer = _build_tokenizer(args, iter_texts(args.data, args.text_field))
        info = prepare_corpus(args.data, tokenizer, out / "data", args.val_frac, args.val_data, args.text_field)
        data_info = {"src": args.data, "val_src": args.val_data, "val_frac": args.val_frac,
                     "text_field": args.text_field, **info.__dict__}
        return tokenizer, data_info, _model_config(args, tokenizer.vocab_size), None

    out, config, tokenizer, model, optimizer, start, metrics = _start_run(args, "pretrain", prepare)
    meta = read_json(out / "data" / "meta.json")
    train_tokens = load_tokens(out / "data" / "train.bin", meta["dtype"])
    val_tokens = load_tokens(out / "data" / "val.bin", meta["dtype"])
    cfg = _train_from(config)
    T = config["model"]["block_size"]
    random_windows(train_tokens, 1, T, np.random.default_rng(0))  # fails early, with the fix, if the data is too short
    final = train_mle(
        model, optimizer, cfg,
        get_batch=lambda rng: random_windows(train_tokens, cfg.batch_size, T, rng),
        val_batches=lambda max_tokens: sequential_windows(val_tokens, cfg.batch_size, T, max_tokens),
        run_dir=out, start_step=start, metrics=metrics, progress=not args.quiet,
    )
    _finish_run(out, config, final, metrics, "pretrain")


def _train_from(config):
    from pglm.train.mle import TrainConfig

    return TrainConfig(**config["train"])


def cmd_sft(args):
    import random

    from pglm.data import read_sft, sft_batch, sft_example
    from pglm.runs import load_run
    from pglm.tasks import get_task
    from pglm.train.mle import train_mle

    task = get_task(args.task) if args.task else None
    if task is not None and args.data:
        raise UserError("pass --data FILE or --task NAME, not both")

    def prepare(out):
        if task is not None:  # solved examples of a built-in task, over the task's own alphabet
            _model_config(args, vocab_size=1)
            tokenizer = task.tokenizer()
            model_cfg = _model_config(args, tokenizer.vocab_size)
            model = None
            if args.init:
                init = load_run(args.init)
                tokenizer, model, model_cfg = init.tokenizer, init.model, init.model.config
        elif args.init:
            init = load_run(args.init)
            tokenizer, model = init.tokenizer, init.model
            model_cfg = model.config
        else:
            from pglm.data import _jsonl_rows, source_files

            _model_config(args, vocab_size=1)  # a bad model flag is reported before the data is read

            def texts():
                for f in source_files(args.data):
                    for _, row in _jsonl_rows(f):
                        yield f"{row.get('prompt', '')}{row.get('completion', '')}"

            tokenizer = _build_tokenizer(args, texts())
            model_cfg, model = _model_config(args, tokenizer.vocab_size), None
        data_info = {"src": args.data, "val_src": args.val_data, "val_frac": args.val_frac, "init": args.init,
                     "task": args.task}
        return tokenizer, data_info, model_cfg, model

    out, config, tokenizer, model, optimizer, start, metrics = _start_run(args, "sft", prepare)
    cfg = _train_from(config)
    T = config["model"]["block_size"]
    data = config["data"]
    task = get_task(data["task"]) if data.get("task") else None

    def solved(rows):
        return [sft_example(tokenizer, r["prompt"], task.solution(r), T) for r in rows]

    if task is not None:  # fresh training problems every step; validation on the held-out problems
        train, val = None, solved(task.heldout())
    else:
        train = read_sft(data["src"], tokenizer, T)
        if data["val_src"]:
            val = read_sft(data["val_src"], tokenizer, T)
        else:  # deterministic split: the last val_frac of the rows (at least one row each side)
            n_val = min(max(1, int(len(train) * data["val_frac"])), len(train) - 1) if len(train) > 1 else 0
            train, val = train[: len(train) - n_val], train[len(train) - n_val :]

    def val_batches(max_tokens):
        rows = val if max_tokens is None else val[: max(1, max_tokens // T)]
        for i in range(0, len(rows), cfg.batch_size):
            yield sft_batch(rows[i : i + cfg.batch_size], tokenizer.pad_id)

    def get_batch(rng):
        if task is not None:
            return sft_batch(solved(task.train_prompts(random.Random(int(rng.integers(2**63))), cfg.batch_size)),
                             tokenizer.pad_id)
        return sft_batch([train[i] for i in rng.integers(0, len(train), cfg.batch_size)], tokenizer.pad_id)

    final = train_mle(model, optimizer, cfg, get_batch=get_batch, val_batches=val_batches, run_dir=out,
                      start_step=start, metrics=metrics, progress=not args.quiet)
    if task is not None:
        from pglm.evaluate import evaluate_task

        final = {**final, **{f"task_{k}": v for k, v in evaluate_task(model, tokenizer, task).items()}}
        print(f"{task.name}: greedy accuracy {final['task_accuracy']:.3f} on {final['task_n_prompts']} held-out problems")
    _finish_run(out, config, final, metrics, "sft")


# ----------------------------------------------------------------------------------------------
# pglm rl


def _check_task_tokenizer(tokenizer, task, where):
    try:
        for row in task.heldout()[:50]:
            tokenizer.encode(row["prompt"] + row["answer"])
    except UserError:
        raise UserError(
            f"the tokenizer of {where} cannot write the {task.name} problems; start from a model trained on "
            f"the task, e.g. pglm sft --task {task.name} --steps 600 --out runs/{task.name}-sft"
        ) from None


def _read_prompt_rows(path: str) -> list[dict]:
    from pglm.data import _jsonl_rows, source_files

    rows = []
    for f in source_files(path):
        for lineno, row in _jsonl_rows(f):
            if not isinstance(row.get("prompt"), str):
                raise UserError(f"{f}:{lineno}: no string field 'prompt'; write lines such as {{\"prompt\": \"2+2=\", \"answer\": \"4\"}}")
            rows.append(row)
    if not rows:
        raise UserError(f"--prompts {path} holds no prompts")
    return rows


def cmd_rl(args):
    from dataclasses import fields as dc_fields

    from pglm.models import ModelConfig
    from pglm.pg.advantages import MovingBaseline
    from pglm.pg.presets import describe, get_preset
    from pglm.rewards.loader import load_rewards
    from pglm.runs import load_run
    from pglm.tasks import get_task
    from pglm.train.checkpoint import load_optimizer, load_weights, prepare_out_dir, read_json, write_json
    from pglm.train.metrics import MetricsLog
    from pglm.train.mle import resolve_device
    from pglm.train.rl import (
        RLConfig,
        ValueHead,
        check_shapes,
        file_rows,
        frozen_copy,
        make_rl_optimizer,
        task_rows,
        train_rl,
    )

    names = {f.name for f in dc_fields(RLConfig)}
    if args.resume:
        config = read_json(Path(args.out) / "config.json") if (Path(args.out) / "config.json").is_file() else None
        if config is None or config.get("command") != "rl":
            raise UserError(f"--resume: {args.out} holds no pglm rl run; drop --resume to start one")
        cfg = RLConfig(**config["rl"])
        if args.steps is not None:
            cfg.steps = args.steps
        source = config["source"]
    else:
        if not args.init:
            raise UserError("pglm rl needs --init RUN: a model trained by pglm pretrain or sft")
        if (args.task is None) == (args.prompts is None):
            raise UserError("pass --task NAME, or --prompts FILE.jsonl with --reward SPEC")
        if args.prompts and not args.reward:
            raise UserError("--prompts needs --reward SPEC (module:function or path/to/file.py:function)")
        cfg = RLConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
        source = {"task": args.task, "prompts": args.prompts, "reward": args.reward, "reward_weight": args.reward_weight}
    preset = get_preset(cfg.algo)
    check_shapes(preset, cfg)

    # What to learn from: a built-in task, or prompts and reward functions of the user's.
    task = get_task(source["task"]) if source["task"] else None
    if task is not None:
        reward_fn, draw_rows = task.reward, task_rows(task, cfg.seed, cfg.prompts_per_step)
    else:
        reward_fn = load_rewards(source["reward"], source["reward_weight"])
        draw_rows = file_rows(_read_prompt_rows(source["prompts"]), cfg.seed, cfg.prompts_per_step)
    N = cfg.max_new_tokens or (task.max_new_tokens if task else None)
    if N is None:
        raise UserError("--prompts needs --max-new-tokens N: how long a completion may be")

    device = resolve_device(cfg.device)
    existed = Path(args.out).exists()
    out = prepare_out_dir(args.out, args.resume, args.overwrite)
    try:
        init = load_run(args.init if not args.resume else out, device)
        model, tokenizer = init.model, init.tokenizer
        if task is not None:
            _check_task_tokenizer(tokenizer, task, args.init or out)
        longest = max(len(tokenizer.encode(r["prompt"])) for r in (task.heldout() if task else draw_rows(0))) + 1
        if model.config.arch == "gpt" and longest + N > model.config.block_size:
            raise UserError(f"prompts of {longest} tokens plus --max-new-tokens {N} exceed the model's context of "
                            f"{model.config.block_size}; lower --max-new-tokens")
        value_head = ValueHead(model.config.d_model).to(device) if preset.advantage == "gae" else None
        baseline = MovingBaseline() if preset.advantage == "moving" else None
        lr = cfg.lr if cfg.lr is not None else preset.lr
        optimizer = make_rl_optimizer(model, value_head, lr, cfg)
        if args.resume:
            state = read_json(init.ckpt_dir / "state.json")
            start = int(state["step"])
            load_optimizer(optimizer, init.ckpt_dir)
            if value_head is not None:
                load_weights(value_head, init.ckpt_dir, "value_head")
            if baseline is not None and "baseline" in state:
                baseline.load_state_dict(state["baseline"])
            ref_model = load_run(config["init"], device).model if cfg.beta > 0 else None
            metrics = MetricsLog(out, resume_step=start, elapsed=state.get("elapsed", 0.0))
            config["rl"] = asdict(cfg)
            write_json(out / "config.json", config)
        else:
            start = 0
            ref_model = frozen_copy(model) if cfg.beta > 0 else None  # loaded only when β > 0
            config = {"pglm_version": __version__, "command": "rl", "init": str(init.ckpt_dir),
                      "model": asdict(ModelConfig(**asdict(model.config))), "rl": asdict(cfg), "source": source,
                      "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}}
            tokenizer.save(out / "tokenizer.json")
            write_json(out / "config.json", config)
            metrics = MetricsLog(out)
    except BaseException:
        if not args.resume:  # a run that never started leaves nothing behind
            import shutil

            for child in out.iterdir() if existed else [out]:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        raise
    print(describe(preset, cfg.beta, cfg.group_size, N, cfg.gamma, cfg.lam), file=sys.stderr)
    print(f"rl: {cfg.prompts_per_step} prompts × {cfg.group_size} samples per step, lr {lr:g}, {cfg.steps} steps "
          f"from {config['init']} → {out}", file=sys.stderr)
    final = train_rl(model, tokenizer, preset, cfg, draw_rows, reward_fn, task, N, out, optimizer,
                     value_head=value_head, ref_model=ref_model, baseline=baseline, start_step=start,
                     metrics=metrics, progress=not args.quiet)
    _finish_run(out, {"train": {"steps": cfg.steps}, **config}, final, metrics, "rl")


# ----------------------------------------------------------------------------------------------
# pglm eval / generate / chat / plot


def cmd_eval(args):
    import tempfile

    from pglm.data import encode_to_file, load_tokens, read_sft, sequential_windows, sft_batch, token_dtype
    from pglm.evaluate import evaluate_lm
    from pglm.runs import load_run
    from pglm.train.mle import resolve_device

    if (args.data is None) == (args.task is None):
        raise UserError("pass --data FILE (loss, perplexity) or --task NAME (accuracy, pass@k)")
    device = resolve_device(args.device)
    if args.task:
        from pglm.evaluate import evaluate_task
        from pglm.tasks import get_task

        task = get_task(args.task)
        run = load_run(args.ckpt, device)
        _check_task_tokenizer(run.tokenizer, task, args.ckpt)
        result = {"ckpt": str(run.ckpt_dir), "task": task.name,
                  **evaluate_task(run.model, run.tokenizer, task, samples=args.samples, temperature=args.temperature)}
        print(json.dumps(result) if args.json else "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in result.items()))
        if args.out:
            from pglm.train.checkpoint import write_json

            write_json(Path(args.out), result)
        return
    run = load_run(args.ckpt, device)
    T, tok = run.model.config.block_size, run.tokenizer
    if args.data.endswith(".jsonl") and _looks_like_sft(args.data):
        rows = read_sft(args.data, tok, T)
        batches = (sft_batch(rows[i : i + args.batch_size], tok.pad_id) for i in range(0, len(rows), args.batch_size))
        result = evaluate_lm(run.model, batches, device)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            n = encode_to_file(args.data, tok, Path(tmp) / "eval.bin", args.text_field)
            if n < 2:
                raise UserError(f"--data {args.data} holds no text to evaluate; pass a non-empty file")
            tokens = load_tokens(Path(tmp) / "eval.bin", __import__("numpy").dtype(token_dtype(tok.vocab_size)).name)
            result = evaluate_lm(run.model, sequential_windows(tokens, args.batch_size, T), device)
    result = {"ckpt": str(run.ckpt_dir), "data": args.data, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{run.ckpt_dir} on {args.data}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
              f"val_token_acc {result['val_token_acc']:.3f}  ({result['val_tokens']:,} tokens)")
    if args.out:
        from pglm.train.checkpoint import write_json

        write_json(Path(args.out), result)


def _looks_like_sft(path):
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
                return isinstance(row, dict) and "prompt" in row and "completion" in row
    return False


def _sample(run, prompts: list[str], args, group_size: int):
    import torch

    from pglm.sampling import generate

    tok, model = run.tokenizer, run.model
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    P = max(len(i) for i in ids)
    if model.config.arch == "gpt":
        if P > model.config.block_size:
            raise UserError(
                f"the prompt is {P} tokens but the model's context is {model.config.block_size}; shorten the prompt"
            )
        if P + args.max_new_tokens > model.config.block_size:
            print(f"note: the context of {model.config.block_size} tokens leaves room for "
                  f"{model.config.block_size - P} new tokens", file=sys.stderr)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stops = args.stop or []
    stop = (lambda row: any(s in tok.decode(row) for s in stops)) if stops else None
    out = generate(
        model, ids, args.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, group_size=group_size, generator=gen, stop=stop,
    )
    texts = []
    for i in range(out.tokens.size(0)):
        text = tok.decode(out.response_ids(i))
        for s in stops:  # cut at the first stop string, which is not part of the answer
            if s in text:
                text = text[: text.index(s)]
        texts.append(text)
    return texts


def _add_sampling_flags(p):
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with probability ≥ p")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when TEXT is generated (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _check_sampling_args(args):
    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    if args.top_k is not None and args.top_k <= 0:
        raise UserError("--top-k must be a positive number of tokens")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")


def cmd_generate(args):
    from pglm.runs import load_run
    from pglm.train.mle import resolve_device

    _check_sampling_args(args)
    if args.num_samples <= 0:
        raise UserError("--num-samples must be positive")
    run = load_run(args.ckpt, resolve_device(args.device))
    texts = _sample(run, [args.prompt], args, args.num_samples)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)


def cmd_chat(args):
    from pglm.runs import load_run
    from pglm.train.mle import resolve_device

    _check_sampling_args(args)
    run = load_run(args.ckpt, resolve_device(args.device))
    print(f"pglm chat with {run.ckpt_dir}: type text and the model continues it; an empty line or Ctrl-D quits.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if not line.strip():
            break
        print(_sample(run, [line], args, 1)[0].strip("\n"))
        args.seed += 1  # a new draw each turn


def cmd_plot(args):
    from pglm.plots import plot_run

    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise UserError(f"{args.run} has no metrics.jsonl; pass a run directory written by pglm")
    for path in plot_run(args.run):
        print(path)


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pglm", description="Policy-gradient language models: from raw text to a model tuned by policy gradient.")
    parser.add_argument("--version", action="version", version=f"pglm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="VERB")

    def data_flags(p, what="SRC: a text file, a glob, a JSONL file with a text field, or builtin:python-docs"):
        p.add_argument("--data", help=what + " (required unless --resume)")
        p.add_argument("--val-data", help="validation data (default: the last --val-frac of --data)")
        p.add_argument("--val-frac", type=float, default=0.1, help="share held out for validation (default 0.1)")
        p.add_argument("--text-field", default="text", help="JSONL field that holds the text (default 'text')")

    p = sub.add_parser("prepare", help="tokenise a corpus into token files", description="Tokenise a corpus into OUT/train.bin and OUT/val.bin.")
    data_flags(p)
    _add_tokenizer_flags(p)
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train a language model by maximum likelihood on raw text",
                       description="Train a GPT or LSTM language model by maximum likelihood on raw text.")
    data_flags(p)
    _add_tokenizer_flags(p)
    _add_model_flags(p)
    _add_train_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/completion JSONL",
                       description="Maximum likelihood on the completions of prompt/completion JSONL (the loss skips prompt tokens).")
    data_flags(p, "FILE.jsonl with 'prompt' and 'completion' fields")
    p.add_argument("--task", help="instead of --data: solved problems of a built-in task (add2, reverse, sort_digits)")
    p.add_argument("--init", help="start from this run or checkpoint (its model and tokenizer)")
    _add_tokenizer_flags(p)
    _add_model_flags(p)
    _add_train_flags(p)
    p.set_defaults(func=cmd_sft)

    from pglm.pg.presets import PRESETS
    from pglm.train.rl import RLConfig

    d = RLConfig()
    p = sub.add_parser("rl", help="tune a model by policy gradient against a reward",
                       description="Tune a model by policy gradient: maximise the expected reward of its samples.")
    p.add_argument("--init", help="the run or checkpoint to start from (its model and tokenizer)")
    p.add_argument("--task", help="a built-in task: add2 | reverse | sort_digits")
    p.add_argument("--prompts", help="instead of --task: JSONL with a 'prompt' field; other fields reach the reward")
    p.add_argument("--reward", action="append", help="with --prompts: module:function or path/to/file.py:function "
                   "(repeatable; builtin:exact_match, builtin:numeric_match, builtin:chrf, builtin:bleu)")
    p.add_argument("--reward-weight", action="append", type=float, help="weight of each --reward, in order")
    p.add_argument("--algo", default=d.algo, help=f"{' | '.join(PRESETS)} (default {d.algo})")
    p.add_argument("--steps", type=int, help=f"rollouts, one or more optimizer steps each (default {d.steps})")
    p.add_argument("--group-size", type=int, help=f"samples per prompt (default {d.group_size})")
    p.add_argument("--prompts-per-step", type=int, help=f"prompts per rollout (default {d.prompts_per_step})")
    p.add_argument("--lr", type=float, help="learning rate (default: the algorithm's, see docs/rl.md)")
    p.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default {d.warmup_steps})")
    p.add_argument("--beta", type=float, help="KL coefficient to the initial model; 0 = no reference (default 0)")
    p.add_argument("--epochs", type=int, help="passes over each rollout (default 1)")
    p.add_argument("--minibatches", type=int, help="optimizer steps per pass (default 1)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, help="longest completion (default: the task's)")
    p.add_argument("--truncation", help="responses without eos: keep | mask | penalise (default: the algorithm's)")
    p.add_argument("--eval-every", type=int, help=f"steps between held-out evaluations (default {d.eval_every})")
    p.add_argument("--eval-samples", type=int, help=f"samples per held-out problem for pass@k (default {d.eval_samples})")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out problems (default all)")
    p.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default {d.ckpt_every})")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint", description="Sample continuations of a prompt.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoints/step_N")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw, as one batch (default 1)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="type text, the model continues it", description="Interactive sampling from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoints/step_N")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("plot", help="draw the curves of a run", description="Draw RUN/plots/*.png from RUN/metrics.jsonl.")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed as one line)
        return int(e.code or 0)
    try:
        args.func(args)
        return 0
    except UserError as e:
        print(f"pglm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        if args.command in ("pretrain", "sft") and out and (Path(out) / "checkpoints" / "latest").is_file():
            latest = (Path(out) / "checkpoints" / "latest").read_text().strip()
            print(f"\ninterrupted: {out}/checkpoints/{latest} is saved; continue with: pglm {args.command} --out {out} --resume",
                  file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
