"""pglm eval, generate, chat and plot: using a trained model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pglm.cli.flags import check_sampling_args
from pglm.cli.train import check_task_tokenizer
from pglm.errors import UserError


def cmd_eval(args):
    import tempfile

    from pglm import dist
    from pglm.data import (
        encode_to_file,
        load_tokens,
        read_sft,
        sequential_windows,
        sft_batch,
        source_files,
        token_dtype,
    )
    from pglm.evaluate import evaluate_lm
    from pglm.runs import load_run

    if (args.data is None) == (args.task is None):
        raise UserError("pass --data FILE (loss, perplexity) or --task NAME (accuracy, pass@k)")
    out_file = checked_out_file(args.out)  # before the work, not after it
    # Under torchrun the batches of --data are shared out over the ranks (evaluate_lm sums the figures);
    # --task evaluates every problem on every rank. Rank 0 prints and writes.
    device = dist.init(args.device, None)
    if args.task:
        from pglm.evaluate import evaluate_task
        from pglm.tasks import get_task

        task = get_task(args.task)
        if args.samples < 0 or args.temperature <= 0:
            raise UserError("--samples must be 0 or more and --temperature positive")
        run = load_run(args.ckpt, device, trust_remote_code=args.trust_remote_code)
        check_task_tokenizer(run.tokenizer, task, args.ckpt)
        result = {"ckpt": str(run.ckpt_dir), "task": task.name,
                  **evaluate_task(run.model, run.tokenizer, task, samples=args.samples, temperature=args.temperature)}
        report(args, out_file, result, "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in result.items()))
        return
    if _is_reward_run(args.ckpt):
        return _eval_reward_model(args, device, out_file)
    run = load_run(args.ckpt, device, trust_remote_code=args.trust_remote_code)
    T, tok = run.model.config.block_size, run.tokenizer
    files = source_files(args.data)  # a missing file or empty glob is one clear line, here
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if files and files[0].suffix == ".jsonl" and _looks_like_sft(files[0]):
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
    report(args, out_file, result, f"{run.ckpt_dir} on {args.data}: val_loss {result['val_loss']:.4f}  val_ppl "
           f"{result['val_ppl']:.2f}  val_token_acc {result['val_token_acc']:.3f}  ({result['val_tokens']:,} tokens)")


def _is_reward_run(ckpt: str) -> bool:
    from pglm.train.checkpoint import find_checkpoint, read_json

    if str(ckpt).startswith("hf:"):
        return False
    run_dir, _ = find_checkpoint(ckpt)
    return read_json(run_dir / "config.json").get("command") == "reward"


def _eval_reward_model(args, device, out_file) -> None:
    """pglm eval of a reward run: pairwise accuracy, mean margin and loss on preference pairs."""
    from pglm.models.policy import max_context
    from pglm.runs import load_reward_model
    from pglm.train.reward import evaluate_pairs, pair_batch, read_preferences

    run = load_reward_model(args.ckpt, device, args.trust_remote_code)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    pairs = read_preferences(args.data, run.tokenizer, max_context(run.model.model))
    batches = [pair_batch(pairs[i : i + args.batch_size], run.tokenizer.pad_id) for i in range(0, len(pairs), args.batch_size)]
    center = run.config.get("data", {}).get("center_coef", 0.0)
    result = {"ckpt": str(run.ckpt_dir), "data": args.data, **evaluate_pairs(run.model, batches, device, center_coef=center)}
    report(args, out_file, result, f"{run.ckpt_dir} on {args.data}: pairwise accuracy {result['val_accuracy']:.3f}  "
           f"mean margin {result['val_margin']:.3f}  loss {result['val_loss']:.4f}  ({result['val_pairs']:,} pairs)")


def report(args, out_file: Path | None, result: dict, line: str) -> None:
    """On rank 0: the figures as `line` (or one JSON object with --json), and in --out when given."""
    from pglm import dist

    if not dist.is_main():
        return
    print(json.dumps(result) if args.json else line)
    write_result(out_file, result)


def checked_out_file(out: str | None) -> Path | None:
    """`--out FILE` of pglm eval, refused up front when it cannot be written."""
    import os

    if out is None:
        return None
    p = Path(out)
    if p.is_dir():
        raise UserError(f"--out {p} is a directory; name a file in it, e.g. --out {p / 'eval.json'}")
    if not p.parent.is_dir():
        raise UserError(f"--out {p}: the directory {p.parent} does not exist; create it first or choose another")
    if not os.access(p.parent, os.W_OK):
        raise UserError(f"--out {p}: the directory {p.parent} is not writable; choose another")
    return p


def write_result(out_file: Path | None, result: dict) -> None:
    from pglm.train.checkpoint import write_json

    if out_file is None:
        return
    try:
        write_json(out_file, result)
    except OSError as e:  # a full disk, a file system gone read-only since the check
        raise UserError(f"--out {out_file} cannot be written ({e.strerror or e}); what was there is unchanged") from None


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

    from pglm.models.policy import max_context
    from pglm.sampling import generate

    tok, model = run.tokenizer, run.model
    ids = [tok.prompt_ids(p) for p in prompts]
    P = max(len(i) for i in ids)
    if max_context(model) is not None:
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




def cmd_generate(args):
    from pglm.runs import load_run
    from pglm.train.mle import resolve_device

    check_sampling_args(args)
    if args.num_samples <= 0:
        raise UserError("--num-samples must be positive")
    run = load_run(args.ckpt, resolve_device(args.device), trust_remote_code=args.trust_remote_code)
    texts = _sample(run, [args.prompt], args, args.num_samples)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)


def cmd_chat(args):
    from pglm.runs import load_run
    from pglm.train.mle import resolve_device

    check_sampling_args(args)
    run = load_run(args.ckpt, resolve_device(args.device), trust_remote_code=args.trust_remote_code)
    # A model whose tokenizer has a chat template gets a conversation, rendered by that template each turn;
    # any other model continues the text typed.
    chat = bool(run.tokenizer.chat_template)
    how = "a conversation through its chat template" if chat else "type text and the model continues it"
    print(f"pglm chat with {run.ckpt_dir}: {how}; an empty line or Ctrl-D quits.")
    messages = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = _sample(run, [run.tokenizer.render_chat(messages) if chat else line], args, 1)[0]
        messages.append({"role": "assistant", "content": reply})
        print(reply.strip("\n"))
        args.seed += 1  # a new draw each turn


def cmd_plot(args):
    from pglm.plots import plot_run

    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise UserError(f"{args.run} has no metrics.jsonl; pass a run directory written by pglm")
    for path in plot_run(args.run):
        print(path)


def cmd_export(args):
    from pglm.export import export_run_summary

    if args.format != "hf":
        raise UserError(f"--format {args.format} is not supported; the one export format is hf")
    s = export_run_summary(args.ckpt, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite,
                           trust_remote_code=args.trust_remote_code)
    print(f"wrote {s.out}: {s.architecture}, {s.n_params:,} parameters, tokenizer {s.tokenizer_kind}")
