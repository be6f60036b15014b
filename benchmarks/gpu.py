"""The GPU checks, in one process: MLE throughput and MFU in bf16 for a ~124M-parameter GPT, and the RL
step time for 256 completions of up to 256 tokens, pglm against TRL GRPOTrainer on the same model.

    python benchmarks/gpu.py               # on one NVIDIA GPU (H200): about 5 minutes
    python benchmarks/gpu.py --tiny        # the same code paths at toy sizes, on any machine (a smoke test)

1. bf16 matmul rate of this GPU (8192² matmuls), measured here: MFU is 6·params·tokens/s over it.
2. MLE: pglm's training step (`mle_step`, bf16 autocast) on a pglm GPT of 12 layers × 768, 12 heads,
   vocabulary 50,304, context 1024, against a plain bf16-autocast loop over transformers'
   GPT2LMHeadModel of the same shape; batch 8 × 1024; interleaved, medians.
3. RL: a GPT-2 124M configuration (random weights, saved once in Hugging Face format), 32 prompts × 8
   completions, up to 256 new tokens, temperature 1, β = 0, one update per batch: pglm rl (`train_rl`
   from `hf:`), against TRL GRPOTrainer with matched settings (bf16 both; TRL without vLLM). Random
   weights rarely sample eos, so most completions run the full 256 tokens: a worst case for both.
4. Reward scoring: 1,024 (prompt, completion) texts of about 150 tokens scored by a reward model of
   Qwen2-0.5B's shape (24 layers × 896, vocabulary 151,936, one output; random weights, bf16), through
   `pglm rl --reward rm:DIR`'s scorer (`pglm.rewards.learned.reward_model`, batches of 64), against a
   plain transformers loop (tokenizer padding, batches of 64, no gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_line  # noqa: E402

from pglm.data import Batch  # noqa: E402
from pglm.models import GPT, model_config  # noqa: E402
from pglm.train.mle import TrainConfig, autocast_for, make_optimizer, mle_step  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / timed(lambda: a @ b, 20) / 1e12


def mle(args, device, peak: float) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    L, H, C, V, T, B = (2, 2, 64, 512, 64, 2) if args.tiny else (12, 12, 768, 50304, 1024, 8)
    torch.manual_seed(0)
    x = torch.randint(0, V, (B, T + 1), device=device)
    batch = Batch(x[:, :-1], x[:, 1:], torch.ones(B, T, dtype=torch.bool, device=device))
    ours = GPT(model_config("gpt", "tiny", vocab_size=V, n_layer=L, n_head=H, d_model=C, block_size=T)).to(device)
    opt = make_optimizer(ours, TrainConfig(steps=1))
    autocast = autocast_for(device)
    peer = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0)).to(device)
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3, fused=device.type == "cuda")

    def peer_step():
        with autocast():
            logits = peer(batch.x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    fns = {"pglm": lambda: mle_step(ours, opt, [batch], 1.0, autocast), "transformers": peer_step}
    for fn in fns.values():
        timed(fn, 3)  # warm-up
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, args.mle_steps))
    n = {"pglm": sum(p.numel() for p in ours.parameters()), "transformers": sum(p.numel() for p in peer.parameters())}
    print(f"\nMLE, bf16 autocast, {L}×{C}, vocabulary {V}, batch {B}×{T} (median step of {args.repeats} × {args.mle_steps})")
    tok_s = {}
    for k in fns:
        s = statistics.median(times[k])
        tok_s[k] = B * T / s
        print(f"  {k:12s} {n[k] / 1e6:6.1f} M params  {s * 1000:7.1f} ms/step  {tok_s[k]:10,.0f} tokens/s  "
              f"MFU {6 * n[k] * tok_s[k] / 1e12 / peak:5.1%} of the measured bf16 matmul rate")
    print(f"  pglm / transformers tokens/s: {tok_s['pglm'] / tok_s['transformers']:.2f}×")


def char_tokenizer():
    """A Hugging Face tokenizer of single characters (digits, '+', '=', ' ', a–j) and <pad> <bos> <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate("0123456789+= abcdefghij")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def rl(args, device) -> None:
    import datasets
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pglm.pg.presets import get_preset
    from pglm.runs import load_run
    from pglm.train.metrics import MetricsLog
    from pglm.train.rl import RLConfig, make_rl_optimizer, train_rl

    L, H, C, P, G, N = (2, 2, 64, 4, 4, 16) if args.tiny else (12, 12, 768, 32, 8, 256)
    work = Path(tempfile.mkdtemp(prefix="pglm-gpu-"))

    tok = char_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0,
                               embd_pdrop=0, attn_pdrop=0, bos_token_id=1, eos_token_id=2,
                               pad_token_id=0)).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    rng = random.Random(0)
    rows = [{"prompt": f"{rng.randrange(100)}+{rng.randrange(100)}="} for _ in range(P * (args.rl_steps + 3))]

    def reward(prompts, completions, **kw):
        return [float(len(c) % 3) for c in completions]  # any reward that tells samples apart

    bf16 = device.type == "cuda"
    # pglm
    run = load_run(f"hf:{work / 'model'}", device)
    model = run.model
    if bf16:
        model.to(torch.bfloat16)
    cfg = RLConfig(algo="grpo", steps=args.rl_steps + 2, prompts_per_step=P, group_size=G, warmup_steps=1,
                   eval_every=10**6, ckpt_every=10**6, device=device.type)
    opt = make_rl_optimizer(model, None, 1e-6, cfg)
    out = work / "pglm"
    out.mkdir()
    sync()
    train_rl(model, run.tokenizer, get_preset("grpo"), cfg, lambda s: rows[s * P:(s + 1) * P], reward, None, N, out, opt,
             progress=False, metrics=MetricsLog(out))
    rl_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"rl"' in x]
    pglm_s = statistics.median(b["time"] - a["time"] for a, b in zip(rl_rows[1:], rl_rows[2:]))
    pglm_len = statistics.mean(r["response_len"] for r in rl_rows)
    # TRL
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            stamps.append(time.perf_counter())

    config = GRPOConfig(output_dir=str(work / "trl"), max_steps=args.rl_steps + 2, per_device_train_batch_size=P * G,
                        num_generations=G, max_completion_length=N, temperature=1.0, beta=0.0, learning_rate=1e-6,
                        lr_scheduler_type="constant", bf16=bf16, gradient_checkpointing=False, use_cpu=not bf16,
                        logging_steps=10**6, save_strategy="no", report_to="none", disable_dropout=True, seed=0)
    trainer = GRPOTrainer(model=str(work / "model"), reward_funcs=reward, args=config,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(work / "model"),
                          callbacks=[Clock()])
    trainer.train()
    trl_s = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))
    print(f"\nRL step, GPT-2 {L}×{C}, {P} prompts × {G} = {P * G} completions of up to {N} tokens, "
          f"{'bf16' if bf16 else 'fp32'} (median of {args.rl_steps} steps after a warm-up)")
    print(f"  pglm rl          {pglm_s:7.3f} s/step  (mean response {pglm_len:.0f} tokens)")
    print(f"  TRL GRPOTrainer  {trl_s:7.3f} s/step")
    print(f"  pglm is {trl_s / pglm_s:.2f}× faster per step")


def reward_scoring(args, device) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config

    from pglm.rewards.learned import reward_model

    L, C, heads, kv, inter, n = (2, 64, 4, 2, 128, 64) if args.tiny else (24, 896, 14, 2, 4864, 1024)
    work = Path(tempfile.mkdtemp(prefix="pglm-gpu-rm-"))
    tok = char_tokenizer()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen2Config(vocab_size=151936, hidden_size=C, num_hidden_layers=L, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=1024,
                         num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = AutoModelForSequenceClassification.from_config(config).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    del model
    rng = random.Random(0)
    prompts = [f"{rng.randrange(100)}+{rng.randrange(100)}=" for _ in range(n)]
    completions = ["".join(rng.choice("abcdefghij 0123456789") for _ in range(rng.randint(120, 160))) for _ in range(n)]

    score = reward_model(str(work / "rm"), device=device, batch_size=64)
    score(prompts[:64], completions[:64])  # warm-up
    sync()
    t0 = time.perf_counter()
    pglm_scores = score(prompts, completions)
    sync()
    pglm_s = time.perf_counter() - t0

    hf_tok = AutoTokenizer.from_pretrained(work / "rm")  # as the scorer loads it (and TRL)
    hf = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=dtype).to(device).eval()
    texts = [p + c + hf_tok.eos_token for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def plain():
        out = []
        for i in range(0, n, 64):
            enc = hf_tok(texts[i : i + 64], return_tensors="pt", padding=True).to(device)
            out += hf(**enc).logits[:, 0].float().tolist()
        return out

    plain()
    sync()
    t0 = time.perf_counter()
    hf_scores = plain()
    sync()
    hf_s = time.perf_counter() - t0
    agree = max(abs(a - b) for a, b in zip(pglm_scores, hf_scores))
    print(f"\nreward scoring, {n_params / 1e6:.0f} M-parameter Qwen2 classifier, {n} completions of 120-160 tokens, "
          f"{dtype}, batches of 64")
    print(f"  pglm rm: scorer      {n / pglm_s:8.1f} completions/s")
    print(f"  transformers loop    {n / hf_s:8.1f} completions/s")
    print(f"  ratio (pglm / plain) {hf_s / pglm_s:8.2f}; largest score difference {agree:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths on any machine")
    p.add_argument("--mle-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rl-steps", type=int, default=4)
    p.add_argument("--skip", choices=["mle", "rl", "reward"], action="append", default=[])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(environment_line())
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_tflops(device, dtype, 1024 if args.tiny else 8192)
    print(f"{dtype} matmul rate measured: {peak:.1f} TFLOP/s")
    if "mle" not in args.skip:
        mle(args, device, peak)
    if "rl" not in args.skip:
        rl(args, device)
    if "reward" not in args.skip:
        reward_scoring(args, device)


if __name__ == "__main__":
    main()
