"""The bigram baseline for a pretraining run: validation perplexity of P(next token | this token).

A language model that cannot beat counting pairs has learned nothing beyond the previous token.
This reads the same token files the run trained and validated on (RUN/data/train.bin, val.bin), so
the comparison is on the same tokens and the same split.

    python examples/bigram_baseline.py runs/gpt-docs

Smoothing: add-k, with k chosen on the validation set from a grid, which flatters the bigram:
the models are held to the strongest version of it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def bigram_ppl(train: np.ndarray, val: np.ndarray, vocab_size: int, k: float) -> float:
    """exp of the mean −log P(val[t+1] | val[t]) under add-k smoothed bigram counts of `train`."""
    counts = np.zeros((vocab_size, vocab_size), dtype=np.float64)
    np.add.at(counts, (train[:-1].astype(np.int64), train[1:].astype(np.int64)), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # k = 0 leaves unseen rows at 0/0; they are never read
        probs = (counts + k) / (counts.sum(1, keepdims=True) + k * vocab_size)
        nll = -np.log(probs[val[:-1].astype(np.int64), val[1:].astype(np.int64)])
    return math.exp(nll.mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a pglm pretrain run directory")
    args = p.parse_args(argv)
    run = Path(args.run)
    meta = json.loads((run / "data" / "meta.json").read_text())
    vocab = json.loads((run / "config.json").read_text())["model"]["vocab_size"]
    train = np.fromfile(run / "data" / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(run / "data" / "val.bin", dtype=meta["dtype"])
    results = {k: bigram_ppl(train, val, vocab, k) for k in (1e-3, 1e-2, 0.1, 0.5, 1.0)}
    best_k = min(results, key=results.get)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    out = {"bigram_val_ppl": results[best_k], "k": best_k, "model_val_ppl": summary.get("val_ppl"),
           "val_tokens": int(len(val) - 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
