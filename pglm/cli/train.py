"""pglm prepare, pretrain and sft: maximum likelihood, and the run directory it writes."""

from __future__ import annotations

import sys
from dataclasses import asdict

from pglm import __version__
from pglm.cli.flags import build_tokenizer, hf_model_from, model_config_from, train_config
from pglm.errors import UserError


def cmd_prepare(args):
    from pglm.data import iter_texts, prepare_corpus
    from pglm.train.checkpoint import write_json
    from pglm.train.rundir import RunDir

    with RunDir(args.out, overwrite=args.overwrite) as out:
        tokenizer = build_tokenizer(args, iter_texts(args.data, args.text_field))
        info = prepare_corpus(args.data, tokenizer, out, args.val_frac, args.val_data, args.text_field)
        tokenizer.save(out / "tokenizer.json")
        write_json(out / "config.json", {"pglm_version": __version__, "command": "prepare", "data": args.data,
                                         "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}})
    print(f"wrote {out}: {info.n_train:,} training and {info.n_val:,} validation tokens, vocabulary {tokenizer.vocab_size:,}")


def start_run(args, out, command: str, prepare, trained=None):
    """Set up a new run in `out` (opened by `run_directory`), or resume it; returns (out, run_config,
    tokenizer, model, optimizer, start_step, metrics).

    `prepare(out)` builds a new run's tokenizer, data and model config: (tokenizer, data_info, ModelConfig).
    `model` is the module the loop trains, wrapped by DDP or FSDP2 under torchrun (`pglm.dist.wrap`):
    the language model's Policy, or `trained(language_model)` (a RewardModel for `pglm reward`).
    With several processes rank 0 creates the run and the others then read it back: the run
    directory must be on a file system every node sees (docs/distributed.md).
    """
    import torch

    from pglm import dist
    from pglm.cli.flags import resumed_config
    from pglm.models import build_model, config_from_dict, count_params
    from pglm.models.policy import POLICY_METHODS, Policy
    from pglm.runs import load_run
    from pglm.tokenizers import load_tokenizer
    from pglm.train.checkpoint import find_checkpoint, load_optimizer, load_weights, read_json, write_json
    from pglm.train.metrics import MetricsLog
    from pglm.train.mle import TrainConfig, lr_at, make_optimizer, stretched_schedule

    def wrapped_and_optimizer(model, train_cfg, device, ckpt=None):
        module = trained(model) if trained is not None else Policy(model)
        for part in module.checkpoint_parts[1:]:  # what a resumed run saved beside the model (a reward head)
            if ckpt is not None and getattr(module, part) is not None:
                load_weights(getattr(module, part), ckpt, part)
        module.to(device).train()
        wrapped = dist.wrap(module, args.dist, device, POLICY_METHODS if trained is None else ())
        return wrapped, make_optimizer(wrapped, train_cfg)

    if args.resume:
        config = read_json(out / "config.json")
        if config.get("command") != command:
            raise UserError(f"--resume: {out} is a '{config.get('command')}' run; resume it with pglm {config.get('command')}")
        _, ckpt = find_checkpoint(out)
        state = read_json(ckpt / "state.json")  # read once: the step reached, elapsed time
        reached = int(state["step"])
        saved_cfg = TrainConfig(**config["train"])
        train_cfg = resumed_config(TrainConfig, config["train"], args, out, reached)  # or one line saying why not
        config["train"] = asdict(train_cfg)
        device = dist.init(train_cfg.device, args.dist)
        loaded = load_run(out, trust_remote_code=args.trust_remote_code)
        tokenizer = loaded.tokenizer
        start_step = reached
        model, optimizer = wrapped_and_optimizer(loaded.model, train_cfg, device, loaded.ckpt_dir)
        load_optimizer(optimizer, loaded.ckpt_dir, model)
        metrics = MetricsLog(out, resume_step=start_step, elapsed=state.get("elapsed", 0.0), tensorboard=train_cfg.tensorboard)
        if dist.is_main():
            write_json(out / "config.json", config)
            saved_world = state.get("world_size", 1)
            print(f"resuming {out} at step {start_step} of {train_cfg.steps}"
                  + (f" (saved by {saved_world} processes, resumed by {dist.world_size()})"
                     if saved_world != dist.world_size() else ""), file=sys.stderr)
            if train_cfg.steps != saved_cfg.steps:  # the cosine schedule is stretched: say what that does
                before, after = lr_at(reached, saved_cfg), lr_at(reached, train_cfg)
                print(stretched_schedule(train_cfg.steps, saved_cfg.steps, reached, before, after), file=sys.stderr)
        return out, config, tokenizer, model, optimizer, start_step, metrics

    if not args.data and not getattr(args, "task", None):
        raise UserError(f"pglm {command} needs --data (or --resume to continue the run in --out)")
    train_cfg = train_config(args)
    device = dist.init(train_cfg.device, args.dist)
    model = None
    with dist.agreed_errors():  # rank 0 sets the run up; a failure there ends every rank
        if dist.is_main():
            tokenizer, data_info, model_cfg, model = prepare(out)
            torch.manual_seed(train_cfg.seed)  # initialisation
            if model is None:
                model = build_model(model_cfg)
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
            metrics = MetricsLog(out, tensorboard=train_cfg.tensorboard)
    if not dist.is_main():  # the same run, read back; rank 0's weights reach every rank in dist.wrap
        config = read_json(out / "config.json")
        tokenizer = load_tokenizer(out / "tokenizer.json")
        model = build_model(config_from_dict(config["model"]), args.trust_remote_code)
        metrics = MetricsLog(out)  # writes nothing off rank 0
    model, optimizer = wrapped_and_optimizer(model, train_cfg, device)
    cfg = model.config if hasattr(model, "config") else model.module.config
    if dist.is_main():
        print(
            f"{command}: {cfg.arch} {config['n_params']:,} parameters{trainable_note(model)} ({cfg.n_layer} layers, width {cfg.d_model}, "
            f"context {cfg.block_size}), {tokenizer.kind} tokenizer with {tokenizer.vocab_size:,} tokens, "
            f"{train_cfg.steps} steps → {out}" + (f", {dist.world_size()} processes ({args.dist or 'ddp'})"
                                                   if dist.world_size() > 1 else ""),
            file=sys.stderr,
        )
    return out, config, tokenizer, model, optimizer, 0, metrics


def trainable_note(model) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return "" if n == total else f" ({n:,} of them trained: LoRA)"


def finish_run(out, config, final_eval, metrics, command):
    from pglm import dist
    from pglm.plots import plot_run
    from pglm.train.checkpoint import write_json

    if not dist.is_main():  # only rank 0 writes
        return

    summary = {"command": command, "steps": config["train"]["steps"], "wall_time_s": round(metrics.elapsed(), 2),
               "n_params": config.get("n_params"), **final_eval}
    write_json(out / "summary.json", summary)
    metrics.close()
    plot_run(out)
    shown = {k: v for k, v in final_eval.items() if isinstance(v, float)}
    print("done: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()) + f"  → {out}")


def cmd_pretrain(args):
    from pglm.train.rundir import run_directory

    with run_directory(args.out, args.resume, args.overwrite) as out:
        pretrain(args, out)


def pretrain(args, out):
    import numpy as np

    from pglm.data import iter_texts, load_tokens, prepare_corpus, random_windows, sequential_windows
    from pglm.train.checkpoint import read_json
    from pglm.train.mle import train_mle

    def prepare(out):
        if args.model.startswith("hf:"):  # a pretrained model goes on learning from the text, with its tokenizer
            init = hf_model_from(args)
            tokenizer, model, model_cfg = init.tokenizer, init.model, None
        else:
            model_config_from(args, vocab_size=1)  # a bad model flag is reported before the data is read
            tokenizer, model = build_tokenizer(args, iter_texts(args.data, args.text_field)), None
        info = prepare_corpus(args.data, tokenizer, out / "data", args.val_frac, args.val_data, args.text_field)
        data_info = {"src": args.data, "val_src": args.val_data, "val_frac": args.val_frac,
                     "text_field": args.text_field, **info.__dict__}
        if model is None:
            model_cfg = model_config_from(args, tokenizer.vocab_size)
        return tokenizer, data_info, model_cfg, model

    out, config, tokenizer, model, optimizer, start, metrics = start_run(args, out, "pretrain", prepare)
    meta = read_json(out / "data" / "meta.json")
    train_tokens = load_tokens(out / "data" / "train.bin", meta["dtype"])
    val_tokens = load_tokens(out / "data" / "val.bin", meta["dtype"])
    cfg = train_config_of(config)
    T = config["model"]["block_size"]
    random_windows(train_tokens, 1, T, np.random.default_rng(0))  # fails early, with the fix, if the data is too short
    final = train_mle(
        model, optimizer, cfg,
        get_batch=lambda rng: random_windows(train_tokens, cfg.batch_size, T, rng),
        val_batches=lambda max_tokens: sequential_windows(val_tokens, cfg.batch_size, T, max_tokens),
        run_dir=out, start_step=start, metrics=metrics, progress=not args.quiet,
    )
    finish_run(out, config, final, metrics, "pretrain")


def train_config_of(config):
    from pglm.train.mle import TrainConfig

    return TrainConfig(**config["train"])


def cmd_sft(args):
    from pglm.train.rundir import run_directory

    with run_directory(args.out, args.resume, args.overwrite) as out:
        sft(args, out)


def sft(args, out):
    import random

    from pglm import dist
    from pglm.data import read_sft, sft_batch, sft_example
    from pglm.tasks import get_task
    from pglm.train.mle import train_mle

    task = get_task(args.task) if args.task else None
    if task is not None and args.data:
        raise UserError("pass --data FILE or --task NAME, not both")

    def prepare(out):
        if task is not None:  # solved examples of a built-in task, over the task's own alphabet
            model = None
            if args.init or args.model.startswith("hf:"):  # its tokenizer must then encode the task
                init = load_init(args)
                tokenizer, model, model_cfg = init.tokenizer, init.model, init.model.config
                check_task_tokenizer(tokenizer, task, args.init or args.model)
            else:
                tokenizer = task.tokenizer()
                model_cfg = model_config_from(args, tokenizer.vocab_size)
        elif args.init or args.model.startswith("hf:"):
            init = load_init(args)
            tokenizer, model = init.tokenizer, init.model
            model_cfg = model.config
        else:
            from pglm.data import jsonl_rows, source_files

            model_config_from(args, vocab_size=1)  # a bad model flag is reported before the data is read

            def texts():
                for f in source_files(args.data):
                    for _, row in jsonl_rows(f):
                        yield f"{row.get('prompt', '')}{row.get('completion', '')}"

            tokenizer = build_tokenizer(args, texts())
            model_cfg, model = model_config_from(args, tokenizer.vocab_size), None
        data_info = {"src": args.data, "val_src": args.val_data, "val_frac": args.val_frac, "init": args.init,
                     "task": args.task}
        return tokenizer, data_info, model_cfg, model

    out, config, tokenizer, model, optimizer, start, metrics = start_run(args, out, "sft", prepare)
    cfg = train_config_of(config)
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
            if not val and dist.is_main():
                print(f"sft: {data['src']} has one row, all of it for training, so there is no validation; "
                      "pass --val-data FILE for validation figures", file=sys.stderr)

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
        final = {**final, **{f"task_{k}": v for k, v in evaluate_task(dist.unwrap(model), tokenizer, task).items()}}
        if dist.is_main():
            print(f"{task.name}: greedy accuracy {final['task_accuracy']:.3f} on {final['task_n_prompts']} held-out problems")
    finish_run(out, config, final, metrics, "sft")




def load_init(args):
    """sft's starting model: --init RUN | hf:PATH, or --model hf:PATH; LoRA added when asked."""
    from pglm.cli.flags import apply_lora, hf_model_from
    from pglm.runs import load_run

    if not args.init:
        return hf_model_from(args)
    if args.model.startswith("hf:"):
        raise UserError("pass --init or --model hf:PATH, not both")
    init = load_run(args.init, trust_remote_code=args.trust_remote_code, block_size=args.block_size)
    apply_lora(args, init.model)
    return init


def check_task_tokenizer(tokenizer, task, where):
    try:
        for row in task.heldout()[:50]:
            tokenizer.encode(row["prompt"] + row["answer"])
    except UserError:
        raise UserError(
            f"the tokenizer of {where} cannot write the {task.name} problems; start from a model trained on "
            f"the task, e.g. pglm sft --task {task.name} --steps 600 --out runs/{task.name}-sft"
        ) from None
