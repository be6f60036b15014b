"""Maximum-likelihood training throughput: pglm's training step against a plain PyTorch loop over
Hugging Face `GPT2LMHeadModel` of the same shape.

pglm runs `pglm.train.mle.mle_step`, the step `pglm pretrain` runs (features → head_logprobs →
masked_mean_nll → backward → clip_grad_norm_ → AdamW step), with the optimizer of
`make_optimizer`. The peer is the loop a PyTorch user writes: logits → cross_entropy → backward →
clip_grad_norm_ → AdamW step, default AdamW settings. Same layers, heads, width, vocabulary,
context, batch, fp32, dropout 0, tied embeddings. The architectures differ as the libraries do
(pglm: Llama-style, RMSNorm, rotary, SwiGLU, no biases; GPT-2: LayerNorm, learned positions, GELU
MLP, biases), so parameter counts differ slightly and MFU = 6·params·tokens/s ÷ the fp32 matmul
rate measured in the same run puts both on one scale. A third contestant, "pglm-gpt2", is pglm's
same step on the very same `GPT2LMHeadModel` (what `pglm pretrain --model hf:DIR` runs): same
architecture and weights as the peer, so its ratio is the training step's alone.

    python benchmarks/mle_vs_hf.py                 # both sizes, < 4 minutes on a 2-core CPU
    python benchmarks/mle_vs_hf.py --sizes a --repeats 9
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_threads_flag, interleaved, matmul_gflops, print_ratio, start  # noqa: E402

from pglm.data import Batch  # noqa: E402
from pglm.models.config import ModelConfig  # noqa: E402
from pglm.models.gpt import GPT  # noqa: E402
from pglm.models.hf import wrap_hf  # noqa: E402
from pglm.train.mle import TrainConfig, make_optimizer, mle_step  # noqa: E402


@dataclass
class Size:
    name: str
    n_layer: int
    n_head: int
    d_model: int
    vocab: int
    T: int  # tokens per sequence (also the context)
    B: int  # sequences per step
    steps: int  # optimizer steps per timed call
    peer_ref: str  # the peer's figure in docs/design.md, "The add2 reference measurements"


SIZES = {
    "a": Size("a: 4×128, vocab 15, 64×11 (add2 MLE)", 4, 4, 128, 15, 11, 64, 10, "13,812 tokens/s, MFU 37.6 %"),
    "b": Size("b: 4×512, vocab 8192, 8×256", 4, 8, 512, 8192, 256, 8, 1, "1,159 tokens/s, MFU 65 %"),
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


def pglm_steps(model, s: Size, batch: Batch):
    """(model, run): run takes s.steps of `mle_step`, the step `pglm pretrain` runs, with its optimizer."""
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3))

    def run():
        for _ in range(s.steps):
            mle_step(model, optimizer, [batch], grad_clip=1.0)

    return model, run


def pglm_setup(s: Size, batch: Batch):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=s.vocab, n_layer=s.n_layer, n_head=s.n_head, d_model=s.d_model,
                            block_size=max(64, s.T), dropout=0.0)).train()
    return pglm_steps(model, s, batch)


def gpt2(s: Size):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=s.vocab, n_positions=max(64, s.T), n_embd=s.d_model, n_layer=s.n_layer,
                     n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).train()


def pglm_gpt2_setup(s: Size, batch: Batch):
    """pglm's training step on the very same GPT2LMHeadModel (`pglm pretrain --model hf:DIR`): same
    architecture and weights as the peer, so the ratio is the training step's own."""
    return pglm_steps(wrap_hf(gpt2(s)).train(), s, batch)


def hf_setup(s: Size, batch: Batch):
    model = gpt2(s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def run():
        for _ in range(s.steps):
            logits = model(batch.x).logits  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, s.vocab), batch.y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return model, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="ab", help="which sizes to run: a, b or ab")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per timed call (default: 10 for a, 1 for b)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per side, interleaved pglm/HF")
    add_threads_flag(ap)
    args = ap.parse_args(argv)

    start(args)
    gflops = matmul_gflops()
    print(f"fp32 matmul 2048×2048: {gflops:.0f} GFLOP/s (median of 10)")
    for key in args.sizes:
        s = SIZES[key]
        if args.steps is not None:
            s.steps = args.steps
        g = torch.Generator().manual_seed(0)
        w = torch.randint(0, s.vocab, (s.B, s.T + 1), generator=g)
        batch = Batch(w[:, :-1], w[:, 1:], torch.ones(s.B, s.T, dtype=torch.bool))
        ours, run_ours = pglm_setup(s, batch)
        ours2, run_ours2 = pglm_gpt2_setup(s, batch)
        peer, run_peer = hf_setup(s, batch)
        # The matmul rate is timed in the same rotation, so MFU divides by the rate of the same minutes.
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        t = interleaved({"pglm": run_ours, "pglm-gpt2": run_ours2, "hf": run_peer, "matmul": partial(torch.matmul, a, b)},
                        args.repeats)
        gflops = 2 * 2048**3 / t["matmul"] / 1e9
        tokens = s.steps * s.B * s.T
        print(f"\nsize {s.name}; {s.steps} steps per call, median of {args.repeats} (peer reference: {s.peer_ref})")
        print(f"  fp32 matmul 2048×2048 in the same rotation: {gflops:.0f} GFLOP/s")
        tok_s = {}
        for name, model in (("pglm", ours), ("pglm-gpt2", ours2), ("hf", peer)):
            tok_s[name] = tokens / t[name]
            mfu = 6 * n_params(model) * tok_s[name] / (gflops * 1e9)
            print(f"  {name:9s} {n_params(model):>11,} params  {1e3 * t[name] / s.steps:8.1f} ms/step  "
                  f"{tok_s[name]:9,.0f} tokens/s  MFU {100 * mfu:5.1f} %")
        print_ratio("  tokens/s, pglm's GPT", tok_s["pglm"], tok_s["hf"], target=1.5 if key == "a" else None)
        print_ratio("  tokens/s, pglm's step on the same GPT2LMHeadModel", tok_s["pglm-gpt2"], tok_s["hf"],
                    target=1.5 if key == "a" else None)


if __name__ == "__main__":
    main()
