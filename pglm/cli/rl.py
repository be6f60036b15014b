"""pglm rl: tune a model by policy gradient."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from pglm import __version__
from pglm.cli.train import check_task_tokenizer, finish_run
from pglm.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 256  # with --prompts, as TRL's max_completion_length


def cmd_rl(args):
    from pglm.train.rundir import run_directory

    with run_directory(args.out, args.resume, args.overwrite) as out:
        rl(args, out)


def rl(args, out):
    from dataclasses import fields as dc_fields

    from pglm import dist
    from pglm.cli.flags import apply_lora
    from pglm.data import read_prompt_rows, render_prompts
    from pglm.models.policy import POLICY_METHODS, Policy, max_context
    from pglm.pg.advantages import MovingBaseline, RunningMoments
    from pglm.pg.presets import describe, get_preset, resolve
    from pglm.rewards.loader import load_rewards
    from pglm.runs import load_run
    from pglm.tasks import get_task
    from pglm.train.checkpoint import load_optimizer, load_weights, read_json, weights_fingerprint, write_json
    from pglm.train.metrics import MetricsLog
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

    if args.top_k is not None or args.top_p is not None:
        raise UserError("pglm rl samples from the policy's whole distribution and has no --top-k or --top-p: a "
                        "truncated distribution is not the policy, which biases the policy gradient and, with "
                        "--rollout-engine vllm, the importance ratio (trl#6789); drop the flag")
    names = {f.name for f in dc_fields(RLConfig)}
    if args.resume:
        config = read_json(Path(args.out) / "config.json") if (Path(args.out) / "config.json").is_file() else None
        if config is None or config.get("command") != "rl":
            raise UserError(f"--resume: {args.out} holds no pglm rl run; drop --resume to start one")
        from pglm.cli.flags import resumed_config
        from pglm.train.checkpoint import find_checkpoint

        _, ckpt = find_checkpoint(out)
        state = read_json(ckpt / "state.json")  # read once: the step reached, baseline, elapsed time
        cfg = resumed_config(RLConfig, config["rl"], args, out, int(state["step"]))
        saved = RLConfig(**config["rl"])
        if cfg.steps != saved.steps and cfg.min_lr_frac < 1 and dist.is_main():  # the decay is stretched: say so
            from pglm.train.mle import stretched_schedule, warmup_cosine

            i, lr = int(state["step"]) - cfg.first_step, resolve(get_preset(cfg.algo), cfg.truncation, cfg.lr).lr
            before, after = (warmup_cosine(i, c.steps - c.first_step, lr, c.warmup_steps, c.min_lr_frac) for c in (saved, cfg))
            print(stretched_schedule(cfg.steps, saved.steps, int(state["step"]), before, after), file=sys.stderr)
        source = config["source"]
    else:
        if not args.init:
            raise UserError("pglm rl needs --init RUN (a model trained by pglm pretrain or sft) or --init hf:PATH")
        if (args.task is None) == (args.prompts is None):
            raise UserError("pass --task NAME, or --prompts FILE.jsonl with --reward SPEC")
        if args.prompts and not args.reward:
            raise UserError("--prompts needs --reward SPEC (module:function or path/to/file.py:function)")
        cfg = RLConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
        source = {"task": args.task, "prompts": args.prompts, "reward": args.reward, "reward_weight": args.reward_weight}
    preset = get_preset(cfg.algo)
    device = dist.init(cfg.device, args.dist)
    check_shapes(preset, cfg)
    recipe = resolve(preset, cfg.truncation, cfg.lr)  # what the run optimises; train_rl resolves the same

    # What to learn from: a built-in task, or prompts and reward functions of the user's.
    task = get_task(source["task"]) if source["task"] else None
    if task is not None:  # its prompts and held-out evaluation; its reward, or the --reward given (a reward model)
        reward_fn, draw_rows = task.reward, task_rows(task, cfg.seed, cfg.prompts_per_step)
        if source["reward"]:
            reward_fn = load_rewards(source["reward"], source["reward_weight"], device, args.trust_remote_code)
        all_rows = task.heldout()  # the longest prompts a run will see, for the context check below
    else:
        reward_fn = load_rewards(source["reward"], source["reward_weight"], device, args.trust_remote_code)
        all_rows = read_prompt_rows(source["prompts"])  # chat rows are rendered once the tokenizer is known
    N = cfg.max_new_tokens if cfg.max_new_tokens is not None else (task.max_new_tokens if task else None)

    # Every rank runs the set-up below; only rank 0 touches the run directory.
    with dist.agreed_errors():
        if args.resume:
            init = load_run(out, device, trust_remote_code=args.trust_remote_code)
        else:
            init = load_run(args.init, device, trust_remote_code=args.trust_remote_code)
            apply_lora(args, init.model)
            init.model.to(device)  # the adapter's new weights too
        model, tokenizer = init.model, init.tokenizer
        if cfg.rollout_engine == "vllm":  # one line now, not after the run directory is written
            from pglm.engines_vllm import check_vllm

            check_vllm(model)
        if task is not None:
            check_task_tokenizer(tokenizer, task, args.init or out)
        else:
            all_rows = render_prompts(all_rows, tokenizer)
            draw_rows = file_rows(all_rows, cfg.seed, cfg.prompts_per_step)
        try:
            longest = max(len(tokenizer.prompt_ids(r["prompt"])) for r in all_rows)
        except UserError as e:
            raise UserError(f"the tokenizer of {args.init or out} cannot encode the prompts ({e}); "
                            "start from a model trained on text like them") from None
        context = max_context(model)
        default_n = N is None  # --prompts without --max-new-tokens: TRL's 256, or what the context leaves
        if default_n:
            N = DEFAULT_MAX_NEW_TOKENS if context is None else min(DEFAULT_MAX_NEW_TOKENS, context - longest)
            if N < 1:
                raise UserError(f"the longest prompt has {longest} tokens, the model's whole context of {context}; "
                                "shorten the prompts")
        if context is not None and longest + N > context:
            raise UserError(f"prompts of {longest} tokens plus --max-new-tokens {N} exceed the model's context of "
                            f"{context}; lower --max-new-tokens")
        for part in getattr(reward_fn, "parts", [reward_fn]):  # a reward model reads prompt and completion whole
            if getattr(part, "context", None) is not None:
                need = max(len(part.encode(r["prompt"], "")) for r in all_rows) + N  # its own tokens, and N new
                if need > part.context:
                    raise UserError(f"the reward model {part.__name__} reads at most {part.context} tokens, but the "
                                    f"longest prompt with --max-new-tokens {N} takes {need}; lower --max-new-tokens, "
                                    "or train the reward model with a longer context (--block-size)")
        value_head = ValueHead(model.config.d_model).to(device) if recipe.estimator.values else None
        baseline = MovingBaseline() if recipe.estimator.state else None
        reward_stats = RunningMoments() if cfg.reward_norm else None
        # The KL's reference: a frozen copy of the initial model, loaded only when β > 0; a LoRA model
        # needs none (train_rl scores it with the adapter switched off).
        needs_ref = cfg.beta > 0 and not getattr(model, "is_lora", False)
        ref_model = None
        if args.ref_offload and not (needs_ref and dist.sharded_mode(args.dist)):
            raise UserError("--ref-offload keeps the sharded reference model of --dist fsdp2 on the CPU; it needs "
                            "--dist fsdp2 and --beta > 0 (and a model without --lora-r, whose reference is itself)")
        if args.resume and value_head is not None:
            load_weights(value_head, init.ckpt_dir, "value_head")
        if args.resume:
            start = int(state["step"])
            if baseline is not None and "baseline" in state:
                baseline.load_state_dict(state["baseline"])
            if reward_stats is not None and "reward_stats" in state:
                reward_stats.load_state_dict(state["reward_stats"])
            if needs_ref:  # the initial model: the --init run loaded again, and checked to be the same
                pinned = config.get("reference_sha256")
                if pinned is not None and weights_fingerprint(config["init"]) != pinned:
                    raise UserError(f"the reference model of this run's KL, {config['init']}, has changed since the "
                                    "run started (its weights differ), so the KL would jump; put it back, or start "
                                    "a new run")
                ref_model = load_run(config["init"], device, trust_remote_code=args.trust_remote_code).model
            config["rl"] = asdict(cfg)
        else:
            start = 0
            if needs_ref:
                ref_model = frozen_copy(model)
            config = {"pglm_version": __version__, "command": "rl", "init": str(init.ckpt_dir),
                      "model": asdict(model.config), "rl": asdict(cfg), "source": source,
                      "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}}
            if needs_ref:  # pinned: a resume checks that the --init run still holds these weights
                config["reference_sha256"] = weights_fingerprint(init.ckpt_dir)
            if dist.is_main():
                tokenizer.save(out / "tokenizer.json")
                write_json(out / "config.json", config)
            metrics = MetricsLog(out)
    engine = None
    if cfg.rollout_engine == "vllm":  # built from the whole model, before FSDP2 shards it
        from pglm.engines_vllm import VLLMEngine

        engine = VLLMEngine(model, tokenizer, device, max_len=context or longest + N)
    # The one module training calls (DDP or FSDP2 of it under torchrun), and its optimizer after it.
    model = dist.wrap(Policy(model, value_head), args.dist, device, POLICY_METHODS)
    optimizer = make_rl_optimizer(model, None, recipe.lr, cfg)
    if args.resume:  # the run directory changes only once everything has loaded
        load_optimizer(optimizer, init.ckpt_dir, model)
        metrics = MetricsLog(out, resume_step=start, elapsed=state.get("elapsed", 0.0))
        if dist.is_main():
            write_json(out / "config.json", config)
    if ref_model is not None and dist.sharded(model):  # sharded like the policy, on the CPU if asked
        ref_model = dist.wrap(Policy(ref_model), args.dist, device, offload=args.ref_offload)
    if dist.is_main():
        print(describe(recipe, cfg.beta, cfg.group_size, N, cfg.gamma, cfg.lam), file=sys.stderr)
        if default_n:
            print(f"rl: completions of up to {N} tokens (the default{'' if N == DEFAULT_MAX_NEW_TOKENS else ', what the context leaves'}; "
                  "--max-new-tokens to change)", file=sys.stderr)
        print(f"rl: {cfg.prompts_per_step} prompts × {cfg.group_size} sample{'s' if cfg.group_size > 1 else ''} per step, "
              f"lr {recipe.lr:g}, {cfg.steps} steps from {config['init']} → {out}"
              + (f", {dist.world_size()} processes ({args.dist or 'ddp'})" if dist.world_size() > 1 else ""),
              file=sys.stderr)
    evaluator = None
    if task is not None:
        from pglm.evaluate import evaluate_task

        def evaluator(m):
            return evaluate_task(m, tokenizer, task, samples=cfg.eval_samples, temperature=cfg.temperature,
                                 limit=cfg.eval_limit, seed=cfg.seed)

    try:
        final = train_rl(model, tokenizer, preset, cfg, draw_rows, reward_fn, evaluator, N, out, optimizer,
                         ref_model=ref_model, baseline=baseline, start_step=start, metrics=metrics,
                         progress=not args.quiet, reward_stats=reward_stats, engine=engine)
    finally:
        if engine is not None:
            engine.close()
    finish_run(out, {"train": {"steps": cfg.steps}, **config}, final, metrics, "rl")
