"""Corpora → token arrays on disk → batches.

A source (`--data SRC`) is a text file, a glob of text files, a JSONL file with a text field, or
`builtin:python-docs`: the Python reference manual that ships with CPython (`pydoc_data.topics`), so
every command works with no download. Text is streamed: a corpus larger than memory is read in
chunks, tokenised, and appended to a flat token file (uint16 when the vocabulary fits) that training
reads through `np.memmap`. Each document is stored as <bos> text <eos>, so a model trained on it
starts a generation from <bos> just as it starts a document.

SFT data is JSONL with `prompt` and `completion` fields; the loss covers the completion and its
end-of-sequence token only.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pglm.errors import UserError

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
_CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: memory stays flat whatever the corpus size


# ----------------------------------------------------------------------------------------------
# Reading sources


def source_files(src: str) -> list[Path]:
    """The files a SRC names (a file or a glob), or [] for a built-in corpus."""
    if src.startswith("builtin:"):
        if src != BUILTIN_PYTHON_DOCS:
            raise UserError(f"unknown built-in corpus '{src}'; the built-in corpus is {BUILTIN_PYTHON_DOCS}")
        return []
    path = Path(src)
    if path.is_dir():
        raise UserError(f"--data {src} is a directory; pass a file or a glob such as '{src}/*.txt'")
    if path.is_file():
        return [path]
    files = sorted(Path(p) for p in glob.glob(src, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"--data {src}: no such file, and no file matches it as a glob; check the path")
    return files


def _utf8_chunks(path: Path) -> Iterator[str]:
    """Decode a file as strict UTF-8 in chunks, naming the byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(_CHUNK_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                # The decoder may hold back up to 3 bytes of an unfinished character from the last chunk.
                where = offset + e.start - len(decoder.getstate()[0])
                raise UserError(
                    f"{path}: the bytes at offset {max(where, 0)} are not UTF-8; convert the file to UTF-8 "
                    "(for example: iconv -f latin1 -t utf-8)"
                ) from None
            if text:
                yield text
            if not raw:
                return
            offset += len(raw)


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-empty line of a JSONL file, with errors that name the line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}: the bytes at offset {offset + e.start} (line {lineno}) are not UTF-8; "
                    "convert the file to UTF-8"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object such as {{\"text\": ...}}")
            yield lineno, row


def iter_documents(src: str, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Stream a source as (text piece, is the end of a document).

    A plain file is one document, read in chunks; a JSONL row is one document; each topic of the
    built-in Python manual is one document.
    """
    files = source_files(src)
    if not files:  # builtin:python-docs
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name], True
        return
    for path in files:
        if path.suffix == ".jsonl":
            for lineno, row in jsonl_rows(path):
                text = row.get(text_field)
                if not isinstance(text, str):
                    raise UserError(
                        f"{path}:{lineno}: no string field '{text_field}'; name the field with --text-field"
                    )
                yield text, True
        else:
            pieces = _utf8_chunks(path)
            previous = next(pieces, None)
            for piece in pieces:  # hold one piece back so the last one can carry the end flag
                yield previous, False
                previous = piece
            if previous is not None:
                yield previous, True


def iter_texts(src: str, text_field: str = "text") -> Iterator[str]:
    """Just the text pieces of a source (what tokenizer training reads); refuses a source with no text."""
    n_chars = 0
    for text, _ in iter_documents(src, text_field):
        n_chars += len(text)
        yield text
    if n_chars == 0:
        raise UserError(f"--data {src} holds no text; pass a non-empty file")


# ----------------------------------------------------------------------------------------------
# Token files


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def encode_to_file(src: str, tokenizer, path: Path, text_field: str = "text") -> int:
    """Tokenise a source into a flat token file; returns the number of tokens written."""
    dtype = token_dtype(tokenizer.vocab_size)
    n = 0
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        batch: list[str] = []
        ends: list[tuple[bool, bool]] = []  # (starts a document, ends one)

        def flush():
            nonlocal n
            for ids, (start, end) in zip(tokenizer.encode_batch(batch), ends):
                ids = [tokenizer.bos_id] * (start and tokenizer.add_bos) + ids + [tokenizer.eos_id] * end
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
            batch.clear()
            ends.clear()

        size = 0
        at_start = True  # each document is <bos> text <eos>, as prompts are at generation time
        for text, end in iter_documents(src, text_field):
            batch.append(text)
            ends.append((at_start, end))
            at_start = end
            size += len(text)
            if size >= _CHUNK_BYTES:
                flush()
                size = 0
        flush()
    os.replace(tmp, path)
    return n


@dataclass
class CorpusInfo:
    """What `prepare_corpus` wrote: token files and their sizes."""

    train_path: str
    val_path: str
    n_train: int
    n_val: int
    dtype: str


def prepare_corpus(
    src: str, tokenizer, out_dir: Path, val_frac: float = 0.1, val_src: str | None = None, text_field: str = "text"
) -> CorpusInfo:
    """Write out_dir/train.bin and out_dir/val.bin.

    The split is deterministic: with `val_src` the validation set is that source; otherwise it is the
    last `val_frac` of the token stream (as nanoGPT does), so the two never share a token.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out_dir / "train.bin", out_dir / "val.bin"
    n_all = encode_to_file(src, tokenizer, train_path, text_field)
    if n_all == 0:
        raise UserError(f"--data {src} holds no text; pass a non-empty file")
    dtype = token_dtype(tokenizer.vocab_size)
    if val_src is not None:
        n_val = encode_to_file(val_src, tokenizer, val_path, text_field)
        if n_val == 0:
            raise UserError(f"--val-data {val_src} holds no text; pass a non-empty file")
        n_train = n_all
    else:
        n_val = max(1, int(n_all * val_frac))
        n_train = n_all - n_val
        if n_train < 2:
            raise UserError(f"--data {src} is too short to split ({n_all} tokens); pass more text")
        tail = np.fromfile(train_path, dtype=dtype, offset=n_train * np.dtype(dtype).itemsize)
        tail.tofile(val_path)
        os.truncate(train_path, n_train * np.dtype(dtype).itemsize)
    info = CorpusInfo(str(train_path), str(val_path), n_train, n_val, np.dtype(dtype).name)
    (out_dir / "meta.json").write_text(json.dumps(info.__dict__, indent=2))
    return info


def load_tokens(path: str | Path, dtype: str) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


# ----------------------------------------------------------------------------------------------
# Batches. Every batch is (x, y, mask): inputs (B, T), targets (B, T) = inputs shifted by one, and
# which targets count in the loss (B, T).


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) long, model inputs
    y: torch.Tensor  # (B, T) long, next-token targets: y[:, t] = token after x[:, t]
    mask: torch.Tensor  # (B, T) bool, targets that count in the loss

    def to(self, device) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.mask.to(device))


def random_windows(tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator) -> Batch:
    """Pretraining batch: `batch_size` random windows of block_size + 1 tokens."""
    n = len(tokens)
    if n < block_size + 1:
        raise UserError(
            f"the training data has {n} tokens, fewer than one window of {block_size + 1}; "
            "use more data or a smaller --block-size"
        )
    starts = rng.integers(0, n - block_size, size=batch_size)
    w = torch.from_numpy(np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64))
    return Batch(w[:, :-1], w[:, 1:], torch.ones(batch_size, block_size, dtype=torch.bool))


def sequential_windows(tokens: np.ndarray, batch_size: int, block_size: int, max_tokens: int | None = None):
    """Evaluation batches: non-overlapping windows so each token is predicted exactly once."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    starts = list(range(0, max(n - 1, 0), block_size))
    for i in range(0, len(starts), batch_size):
        rows = [np.asarray(tokens[s : min(s + block_size + 1, n)], dtype=np.int64) for s in starts[i : i + batch_size]]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for j, r in enumerate(rows):
            x[j, : len(r) - 1] = torch.from_numpy(r[:-1])
            y[j, : len(r) - 1] = torch.from_numpy(r[1:])
            mask[j, : len(r) - 1] = True
        yield Batch(x, y, mask)


# ----------------------------------------------------------------------------------------------
# SFT: prompt/completion pairs


@dataclass
class SFTExample:
    ids: list[int]  # bos + prompt + completion + eos
    n_prompt: int  # bos + prompt tokens: targets before this index are not trained on


def sft_example(tokenizer, prompt: str, completion: str, block_size: int) -> SFTExample | None:
    """<bos> prompt completion <eos>, cut to block_size + 1 tokens; None when the prompt fills it all."""
    p = tokenizer.prompt_ids(prompt)
    ids = (p + tokenizer.encode(completion) + [tokenizer.eos_id])[: block_size + 1]
    return SFTExample(ids, len(p)) if len(p) < len(ids) else None


def read_sft(path: str, tokenizer, block_size: int) -> list[SFTExample]:
    """Read prompt/completion JSONL; sequences longer than block_size + 1 keep their first tokens."""
    files = source_files(path)
    if not files:
        raise UserError("SFT data must be a JSONL file with 'prompt' and 'completion' fields")
    examples = []
    for file in files:
        for lineno, row in jsonl_rows(file):
            prompt, completion = row.get("prompt"), row.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise UserError(
                    f"{file}:{lineno}: SFT rows need string fields 'prompt' and 'completion'; "
                    'write lines such as {"prompt": "2+2=", "completion": "4"}'
                )
            example = sft_example(tokenizer, prompt, completion, block_size)
            if example is None:
                raise UserError(
                    f"{file}:{lineno}: the prompt alone fills the context of {block_size} tokens; "
                    "shorten it or use a larger --block-size"
                )
            examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no examples; add lines such as {{\"prompt\": ..., \"completion\": ...}}")
    return examples


def sft_batch(examples: list[SFTExample], pad_id: int) -> Batch:
    """Right-padded batch; the loss mask covers completion tokens and the final eos only."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        n = len(e.ids) - 1
        x[i, :n] = ids[:-1]
        y[i, :n] = ids[1:]
        # target y[t] = ids[t + 1] is a completion token when t + 1 >= n_prompt
        mask[i, e.n_prompt - 1 : n] = True
    return Batch(x, y, mask)


# ---- prompt datasets for policy gradient (pglm rl --prompts) ----


def _dataset_rows(path: Path, label: str) -> list[dict]:
    """Rows of a Parquet file or a `datasets` save_to_disk directory, read with Hugging Face datasets."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{label} needs Hugging Face datasets to read; pip install 'pglm[hf]'") from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001 — datasets and pyarrow raise many kinds; all mean "not readable"
        raise UserError(f"{label} cannot be read as a dataset ({str(e).splitlines()[0][:200]}); pass a JSONL file, "
                        "a Parquet file or a directory written by Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{label} holds the splits {', '.join(ds)} and no 'train'; save the split to use on its own")
        ds = ds["train"]
    return [dict(row) for row in ds]


def read_prompt_rows(src: str) -> list[dict]:
    """The rows of a prompt dataset: JSONL lines, a Parquet file, or a `datasets` save_to_disk directory.

    Each row has either `prompt` (a string, or a list of chat messages as TRL's conversational
    datasets have it) or `messages` (chat messages); every other field reaches the reward function.
    Chat rows are rendered later, by `render_prompts`, once the model's tokenizer is known.
    """
    label = f"--prompts {src}"
    path = Path(src)
    if path.is_dir() or path.suffix == ".parquet":
        found = [(f"{src} row {i + 1}", row) for i, row in enumerate(_dataset_rows(path, label))]
    else:
        found = [(f"{f}:{lineno}", row) for f in source_files(src) for lineno, row in jsonl_rows(f)]
    rows = []
    for where, row in found:
        prompt = row.get("prompt", row.get("messages"))
        is_chat = isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
        if not (isinstance(prompt, str) or (is_chat and prompt)):
            raise UserError(f"{where}: no string 'prompt' and no chat 'messages'; write rows such as "
                            '{"prompt": "2+2=", "answer": "4"} or {"messages": [{"role": "user", "content": "2+2?"}]}')
        rows.append(row)
    if not rows:
        raise UserError(f"{label} holds no prompts")
    return rows


def render_prompts(rows: list[dict], tokenizer) -> list[dict]:
    """Rows whose `prompt` is text: chat messages (`messages`, or a list under `prompt`) go through the
    tokenizer's chat template, ready for the assistant's turn; the messages stay as a column."""
    out = []
    for row in rows:
        prompt = row.get("prompt", row.get("messages"))
        if isinstance(prompt, list):
            row = {**row, "prompt": tokenizer.render_chat(prompt)}
        out.append(row)
    return out
