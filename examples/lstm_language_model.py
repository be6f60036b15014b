"""An LSTM language model on the Python reference manual: the classic recipe, done right.

The pieces of Zaremba et al. (2014) and Merity et al. (2017, AWD-LSTM) that matter at small scale,
each one line below and each pointing at where pglm implements it:

- a loss at every position, not only the last one (LSTMLM.forward returns (B, T, V) logits);
- truncated backpropagation through time over random windows of the corpus (data.random_windows);
- dropout between layers and on the embeddings, off at evaluation (models/lstm.py);
- input and output embeddings tied (Press & Wolf 2017; Inan et al. 2017);
- forget-gate bias 1 (Jozefowicz et al. 2015);
- gradient-norm clipping (Pascanu et al. 2013), AdamW with warm-up and cosine decay (train/mle.py);
- perplexity on held-out text, compared with a bigram model on the same tokens and split.

    python examples/lstm_language_model.py --steps 250 --out runs/lstm-example

It calls the library directly, so it reads as the recipe `pglm pretrain --model lstm` follows.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from pglm.data import iter_texts, load_tokens, prepare_corpus, random_windows, sequential_windows
from pglm.models import build_model, count_params, model_config
from pglm.sampling import generate
from pglm.tokenizers import train_tokenizer
from pglm.train.checkpoint import prepare_out_dir
from pglm.train.mle import TrainConfig, make_optimizer, train_mle


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Train an LSTM language model on builtin:python-docs.")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--out", default="runs/lstm-example")
    p.add_argument("--size", default="small", help="tiny | small | medium")
    args = p.parse_args(argv)

    out = prepare_out_dir(args.out, resume=False, overwrite=True)
    # 1. Text → characters → token files (train.bin, val.bin: the last 10 % of the stream).
    tokenizer = train_tokenizer("char", iter_texts("builtin:python-docs"))
    corpus = prepare_corpus("builtin:python-docs", tokenizer, out / "data")
    train, val = load_tokens(corpus.train_path, corpus.dtype), load_tokens(corpus.val_path, corpus.dtype)

    # 2. The model: 2 × 512 LSTM, tied embeddings, dropout 0.1 (the "small" size).
    torch.manual_seed(0)
    cfg = model_config("lstm", args.size, vocab_size=tokenizer.vocab_size)
    model = build_model(cfg)
    print(f"LSTM: {count_params(model):,} parameters, {cfg.n_layer} layers × {cfg.d_model}, windows of {cfg.block_size}")

    # 3. Maximum likelihood: every position predicts the next character.
    train_cfg = TrainConfig(steps=args.steps, batch_size=32, lr=2e-3, eval_every=max(1, args.steps // 5), grad_clip=1.0)
    final = train_mle(
        model, make_optimizer(model, train_cfg), train_cfg,
        get_batch=lambda rng: random_windows(train, train_cfg.batch_size, cfg.block_size, rng),
        val_batches=lambda n: sequential_windows(val, train_cfg.batch_size, cfg.block_size, n),
        run_dir=out,
    )

    # 4. The baseline it has to beat: a bigram model on the same tokens and split.
    spec = importlib.util.spec_from_file_location("bigram", Path(__file__).with_name("bigram_baseline.py"))
    bigram = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bigram)
    bigram_ppl = min(bigram.bigram_ppl(train, val, tokenizer.vocab_size, k) for k in (1e-3, 1e-2, 0.1, 1.0))
    print(f"validation perplexity: LSTM {final['val_ppl']:.2f}, bigram {bigram_ppl:.2f}")

    # 5. Sample, carrying the LSTM state from token to token.
    model.eval()
    prompt = [tokenizer.bos_id, *tokenizer.encode("The while statement")]
    g = generate(model, [prompt], 200, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=0.8,
                 generator=torch.Generator().manual_seed(0))
    print("The while statement" + tokenizer.decode(g.response_ids(0)))
    return {"val_ppl": final["val_ppl"], "bigram_val_ppl": bigram_ppl}


if __name__ == "__main__":
    main()
