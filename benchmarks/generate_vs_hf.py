"""Sampling throughput: pglm `generate` against `transformers` `generate`, new tokens per second.

Both sample 32 new tokens after 8-token prompts at temperature 1 from the full distribution (no
top-k, no top-p), with a KV cache, fp32, at batch 1 and batch 64. Neither may stop early: pglm is
given eos_id = vocab_size, an id the model cannot sample, and the HF model has no eos token (its
config's eos_token_id is None), so both always produce 32 tokens; the script checks the lengths.

Two pglm contestants: pglm's own GPT (Llama-style: RMSNorm, rotary, SwiGLU; same layers, heads,
width, vocabulary and context, different weights), and "pglm-gpt2", pglm's `generate` on the very
same `GPT2LMHeadModel` object the peer samples from (what `pglm generate --ckpt hf:DIR` runs), so
that ratio compares the two sampling loops on one model.

    python benchmarks/generate_vs_hf.py            # < 3 minutes on a 2-core CPU
    python benchmarks/generate_vs_hf.py --batches 1 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_threads_flag, interleaved, print_ratio, start  # noqa: E402

from pglm.models.config import ModelConfig  # noqa: E402
from pglm.models.gpt import GPT  # noqa: E402
from pglm.models.hf import wrap_hf  # noqa: E402
from pglm.sampling import generate  # noqa: E402

V, N_LAYER, N_HEAD, D_MODEL, CONTEXT = 15, 4, 4, 128, 64
PROMPT_LEN, NEW_TOKENS = 8, 32
PEER_REF = {1: "577 new tokens/s", 64: "15,634 new tokens/s"}


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=N_LAYER, n_head=N_HEAD,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                     pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    return model


def time_batch(ours, ours_gpt2, peer, B: int, repeats: int) -> None:
    """Time both samplers at batch B, interleaved, and print new tokens/s and the ratio."""
    prompts = torch.randint(3, V, (B, PROMPT_LEN), generator=torch.Generator().manual_seed(B))
    prompt_lists = prompts.tolist()
    attention_mask = torch.ones_like(prompts)
    g = torch.Generator().manual_seed(0)

    def run_ours(model=ours):
        out = generate(model, prompt_lists, NEW_TOKENS, eos_id=V, pad_id=0, temperature=1.0, generator=g)
        assert out.response.shape == (B, NEW_TOKENS)

    @torch.no_grad()
    def run_peer():
        out = peer.generate(prompts, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, max_new_tokens=NEW_TOKENS, use_cache=True)
        assert out.shape == (B, PROMPT_LEN + NEW_TOKENS)

    t = interleaved({"pglm": run_ours, "pglm-gpt2": lambda: run_ours(ours_gpt2), "hf": run_peer}, repeats, warmup=2)
    tok_s = {name: B * NEW_TOKENS / seconds for name, seconds in t.items()}
    print(f"\nbatch {B}: {NEW_TOKENS} new tokens after {PROMPT_LEN}-token prompts, median of {repeats} "
          f"(peer reference: {PEER_REF.get(B, '-')})")
    for name in t:
        print(f"  {name:9s} {1e3 * t[name]:8.1f} ms per call  {1e3 * t[name] / NEW_TOKENS:6.2f} ms per step  "
              f"{tok_s[name]:9,.0f} new tokens/s")
    print_ratio("  new tokens/s, pglm's GPT", tok_s["pglm"], tok_s["hf"], target=3)
    print_ratio("  new tokens/s, pglm on the same GPT2LMHeadModel", tok_s["pglm-gpt2"], tok_s["hf"], target=3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per side, interleaved pglm/HF")
    add_threads_flag(ap)
    args = ap.parse_args(argv)

    start(args)
    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=V, n_layer=N_LAYER, n_head=N_HEAD, d_model=D_MODEL, block_size=CONTEXT)).eval()
    peer = hf_model()
    ours_gpt2 = wrap_hf(peer).eval()  # the same module: pglm's sampler over the peer's weights
    print(f"pglm GPT {sum(p.numel() for p in ours.parameters()):,} params vs GPT2LMHeadModel "
          f"{sum(p.numel() for p in peer.parameters()):,} params: same shape ({N_LAYER}×{D_MODEL}, {N_HEAD} heads, "
          f"vocab {V}), different architectures and weights; pglm-gpt2 samples from the peer's own module")
    for B in (int(b) for b in args.batches.split(",")):
        time_batch(ours, ours_gpt2, peer, B, args.repeats)


if __name__ == "__main__":
    main()
