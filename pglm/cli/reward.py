"""pglm reward: train a reward model on preference pairs (Bradley–Terry; pglm/train/reward.py)."""

from __future__ import annotations

import sys
from functools import partial

from pglm.cli.train import finish_run, load_init, start_run, train_config_of
from pglm.errors import UserError


def cmd_reward(args):
    from pglm.train.rundir import run_directory

    with run_directory(args.out, args.resume, args.overwrite) as out:
        reward(args, out)


def reward(args, out):
    from pglm import dist
    from pglm.errors import check_number
    from pglm.models.policy import max_context
    from pglm.models.reward import RewardModel
    from pglm.train.mle import train_mle
    from pglm.train.reward import evaluate_pairs, pair_batch, read_preferences, reward_step

    if not args.resume and not (args.init or args.model.startswith("hf:")):
        raise UserError("pglm reward needs --init RUN (a model trained by pglm pretrain or sft) or --init hf:PATH; "
                        "the reward model is that language model with a scalar head")
    if args.init and args.init.startswith("hf:"):  # --init hf:PATH reads as --model hf:PATH
        args.model, args.init = args.init, None
    check_number("--center-coef", args.center_coef, 0, example="0.01 (0: off)")

    read = {}  # the pairs, read (and checked) before a new run says anything, as pretrain reads its text

    def prepare(out):
        init = load_init(args)
        context = max_context(init.model)
        read["train"] = read_preferences(args.data, init.tokenizer, context)
        if args.val_data:
            read["val"] = read_preferences(args.val_data, init.tokenizer, context)
        data_info = {"src": args.data, "val_src": args.val_data, "val_frac": args.val_frac,
                     "init": args.init or args.model, "center_coef": args.center_coef}
        return init.tokenizer, data_info, init.model.config, init.model

    out, config, tokenizer, model, optimizer, start, metrics = start_run(args, out, "reward", prepare, RewardModel)
    cfg = train_config_of(config)
    data = config["data"]
    context = max_context(dist.unwrap(model).model)
    pairs = read.get("train") or read_preferences(data["src"], tokenizer, context)  # other ranks, and a resume
    if data["val_src"]:
        val = read.get("val") or read_preferences(data["val_src"], tokenizer, context)
    else:  # deterministic split: the last val_frac of the pairs (at least one each side)
        n_val = min(max(1, int(len(pairs) * data["val_frac"])), len(pairs) - 1) if len(pairs) > 1 else 0
        pairs, val = pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]
        if not val and dist.is_main():
            print(f"reward: {data['src']} has one pair, all of it for training, so there is no validation; "
                  "pass --val-data FILE for validation figures", file=sys.stderr)

    def val_batches(max_tokens):  # the periodic evaluations read about max_tokens tokens of pairs
        rows = val
        if max_tokens is not None:
            per_pair = max(1, sum(len(e.chosen) + len(e.rejected) for e in val) // max(1, len(val)))
            rows = val[: max(1, max_tokens // per_pair)]
        for i in range(0, len(rows), cfg.batch_size):
            yield pair_batch(rows[i : i + cfg.batch_size], tokenizer.pad_id)

    def get_batch(rng):
        return pair_batch([pairs[i] for i in rng.integers(0, len(pairs), cfg.batch_size)], tokenizer.pad_id)

    center = data["center_coef"]
    final = train_mle(model, optimizer, cfg, get_batch=get_batch, val_batches=val_batches, run_dir=out,
                      start_step=start, metrics=metrics, progress=not args.quiet,
                      step_fn=partial(reward_step, center_coef=center), validate=partial(evaluate_pairs, center_coef=center))
    finish_run(out, config, final, metrics, "reward")
