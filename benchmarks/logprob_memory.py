"""Peak memory of scoring a batch with a 32k vocabulary: chunked log-probs against full logits.

    python benchmarks/logprob_memory.py [--vocab 32000] [--batch 8] [--seq 512] [--width 256]

Each variant runs in a fresh process, which builds a pglm GPT, takes its resident set size, then
scores the batch (features → log-probs of the targets → a loss → backward) and reports the peak
resident set size above that baseline (getrusage ru_maxrss), and the bytes autograd keeps for
backward from the log-prob step (counted by a saved-tensors hook; the peak also holds the model's
activations, and freed memory the allocator keeps). "full" computes lm_head over the whole
batch at once, as a plain `model(tokens)` + cross-entropy loop does; "chunked" is what pglm's
training and scoring use (`pglm.pg.logprobs.head_logprobs`: at most CHUNK_ELEMENTS = 2^25 logits at a time, each
chunk recomputed in backward).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(args) -> None:
    import torch

    from pglm.models import GPT, model_config
    from pglm.pg.logprobs import CHUNK_ELEMENTS, head_logprobs

    torch.manual_seed(0)
    cfg = model_config("gpt", "tiny", vocab_size=args.vocab, d_model=args.width, n_head=4, n_layer=2, block_size=args.seq)
    model = GPT(cfg)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # warm-up on a tiny batch so allocator and kernels are set up before the baseline counts
    limit = CHUNK_ELEMENTS if args.variant == "chunked" else float("inf")
    h = model.features(tokens[:1, :8])
    head_logprobs(h[:, :-1], model.lm_head, tokens[:1, 1:8], max_elements=limit).sum().backward()
    model.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    h = model.features(tokens)[:, :-1]  # (B, T-1, C)
    saved = [0]  # bytes autograd keeps for backward from the log-prob step (lm_head onwards)

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = head_logprobs(h, model.lm_head, tokens[:, 1:], max_elements=limit)  # (B, T-1)
    (-logp.mean()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.variant, "peak_above_baseline_mib": (peak - base) / 1024,
                      "saved_for_backward_mib": saved[0] / 2**20, "loss": float(-logp.mean())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    full_logits_mib = args.batch * (args.seq - 1) * args.vocab * 4 / 2**20
    print(f"vocab {args.vocab}, batch {args.batch} × {args.seq} tokens, width {args.width}: one float32 copy of the "
          f"full logits is {full_logits_mib:.0f} MiB")
    results = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, *(f"--{k}={v}" for k, v in
                                                                  [("vocab", args.vocab), ("batch", args.batch),
                                                                   ("seq", args.seq), ("width", args.width)])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        r = results[variant]
        print(f"{variant:8s} held for backward by the log-prob step {r['saved_for_backward_mib']:7.0f} MiB   "
              f"process peak above baseline {r['peak_above_baseline_mib']:6.0f} MiB   loss {r['loss']:.6f}")
    ratio = results["full"]["peak_above_baseline_mib"] / max(results["chunked"]["peak_above_baseline_mib"], 1e-9)
    print(f"full / chunked peak: {ratio:.1f}×  (same loss: "
          f"{abs(results['full']['loss'] - results['chunked']['loss']) < 1e-5})")


if __name__ == "__main__":
    main()
