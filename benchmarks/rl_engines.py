"""`pglm rl --rollout-engine vllm` against `--rollout-engine torch`, the same rollouts, one invocation.

    python benchmarks/rl_engines.py            # one NVIDIA GPU with vLLM installed: a 0.5 B Qwen2 shape
    python benchmarks/rl_engines.py --tiny     # toy sizes, any machine with vLLM (the CPU build: docs/vllm.md)

The model is a random Qwen2 of Qwen2-0.5B's shape (24 layers × 896, 14 heads, 2 KV heads, vocabulary
151,936, tied embeddings), saved once in Hugging Face format with a word-level tokenizer of that many
words (nothing is downloaded: the GPU machine has no network). Each engine runs S steps of `pglm rl
--init hf:DIR` on P prompts × G samples of up to N new tokens (temperature 1, GRPO, β = 0; bf16
autocast on CUDA), in a process of its own, one after the other. Random weights rarely sample eos, so
most completions run the full N tokens, for both engines alike. From each run's metrics.jsonl, over
the steps after the first (which includes warm-up): completions per second of the rollout
(P·G / rollout_s), seconds per step, and for vLLM the sync time per step and the engine/trainer
mismatch statistics. Random weights spread their probability thinly over the whole vocabulary, so
the bf16 mismatch of a trained model may differ: these figures are of the plumbing, not of a recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_line  # noqa: E402


def word_tokenizer(vocab_size: int):
    """A Hugging Face word-level tokenizer: <pad> <bos> <eos>, then the words w0, w1, ... up to vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def write_model(work: Path, tiny: bool) -> tuple[Path, int]:
    """The model directory, and its vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    # --tiny: heads of 64, the least vLLM's CPU attention takes
    L, C, heads, kv, inter, V = (2, 128, 2, 2, 256, 512) if tiny else (24, 896, 14, 2, 4864, 151936)
    tok = word_tokenizer(V)
    config = Qwen2Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    print(f"model: random Qwen2, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, "
          f"{L} layers × {C}, vocabulary {V:,}")
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    return work / "model", V


def run(engine: str, model: Path, work: Path, args) -> list[dict]:
    out = work / f"rl-{engine}"
    cmd = [sys.executable, "-m", "pglm", "rl", "--init", f"hf:{model}", "--prompts", str(work / "prompts.jsonl"),
           "--reward", f"{work / 'reward.py'}:longer", "--algo", "grpo", "--steps", str(args.steps),
           "--prompts-per-step", str(args.prompts), "--group-size", str(args.group_size), "--max-new-tokens",
           str(args.max_new_tokens), "--rollout-engine", engine, "--ckpt-every", str(10**6), "--out", str(out),
           "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "rl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths on any machine with vLLM")
    p.add_argument("--steps", type=int, default=None, help="steps per engine (default 5; --tiny 3)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 32; --tiny 4)")
    p.add_argument("--group-size", type=int, default=None, help="samples per prompt (default 8; --tiny 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest completion (default 256; --tiny 16)")
    args = p.parse_args()
    for name, full, tiny in (("steps", 5, 3), ("prompts", 32, 4), ("group_size", 8, 4), ("max_new_tokens", 256, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    print(environment_line())
    work = Path(tempfile.mkdtemp(prefix="pglm-engines-"))
    model, V = write_model(work, args.tiny)
    rng = random.Random(0)
    (work / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(f"w{rng.randrange(V - 3)}" for _ in range(16))}) + "\n"
        for _ in range(args.prompts * args.steps)))
    (work / "reward.py").write_text("def longer(prompts, completions, **kw):\n"
                                    "    return [float(len(c.split())) for c in completions]\n")
    B = args.prompts * args.group_size
    print(f"{args.steps} steps of {args.prompts} prompts × {args.group_size} samples, up to {args.max_new_tokens} "
          "new tokens, temperature 1, GRPO; figures are medians over the steps after the first")
    results = {}
    for engine in ("torch", "vllm"):
        rows = run(engine, model, work, args)[1:]
        results[engine] = {
            "completions_per_s": statistics.median(B / r["rollout_s"] for r in rows),
            "step_s": statistics.median(B / r["samples_per_s"] for r in rows),
            "response_len": statistics.median(r["response_len"] for r in rows),
        }
        if engine == "vllm":
            results[engine].update({k: statistics.median(r[k] for r in rows) for k in
                                    ("sync_s", "logp_diff_mean", "logp_diff_max", "is_ratio_mean", "is_ratio_max",
                                     "is_clip_frac")})
            results[engine]["stale_steps"] = sum(bool(r["stale_weights"]) for r in rows)
        print(f"  {engine:5s} " + "  ".join(f"{k} {v:.4g}" for k, v in results[engine].items()))
    ratio = results["vllm"]["completions_per_s"] / results["torch"]["completions_per_s"]
    step = results["torch"]["step_s"] / results["vllm"]["step_s"]
    print(f"rollout completions/s, vllm / torch: {ratio:.2f}×; whole step, torch time / vllm time: {step:.2f}×")


if __name__ == "__main__":
    main()
