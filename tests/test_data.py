import json

import numpy as np
import pytest

from pglm.data import (
    iter_documents,
    prepare_corpus,
    random_windows,
    read_sft,
    sequential_windows,
    sft_batch,
)
from pglm.errors import UserError
from pglm.tokenizers import char_tokenizer, train_tokenizer


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("hello wörld".encode() + b"\nabc \xe9t\xe9\n")  # "hello wörld" is 12 bytes, so the latin-1 é (0xE9) is at offset 17
    with pytest.raises(UserError, match=r"latin\.txt: the bytes at offset 17 are not UTF-8"):
        list(iter_documents(str(f)))


def test_non_utf8_across_chunk_boundary(tmp_path, monkeypatch):
    import pglm.data

    monkeypatch.setattr(pglm.data, "_CHUNK_BYTES", 4)
    f = tmp_path / "x.txt"
    f.write_bytes("ab€c".encode() + b"\xff")  # € is 3 bytes; 0xFF at offset 6
    with pytest.raises(UserError, match="offset 6 "):
        list(iter_documents(str(f)))
    f.write_bytes("ab€cdé€".encode())  # multibyte characters split across 4-byte chunks decode fine
    assert "".join(t for t, _ in iter_documents(str(f))) == "ab€cdé€"


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: no string field 'text'"):
        list(iter_documents(str(f)))
    f.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        list(iter_documents(str(f)))


def test_missing_sources(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        list(iter_documents(str(tmp_path / "nope*.txt")))
    with pytest.raises(UserError, match="unknown built-in corpus"):
        list(iter_documents("builtin:nope"))
    with pytest.raises(UserError, match="is a directory"):
        list(iter_documents(str(tmp_path)))


def test_builtin_python_docs_is_the_cpython_manual():
    docs = list(iter_documents("builtin:python-docs"))
    text = "".join(t for t, _ in docs)
    assert len(docs) > 50 and all(end for _, end in docs)
    assert "The if statement" in text or "if_stmt" in text


def test_prepare_corpus_split_is_deterministic_and_disjoint(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abc" * 100)
    b.write_text("xyz" * 50)
    src = str(tmp_path / "*.txt")
    tok = train_tokenizer("char", (t for t, _ in iter_documents(src)))
    info = prepare_corpus(src, tok, tmp_path / "out", val_frac=0.2)
    train = np.fromfile(info.train_path, dtype=info.dtype)
    val = np.fromfile(info.val_path, dtype=info.dtype)
    assert info.dtype == "uint16"
    # every document is <bos> text <eos>; the split is the tail of the stream
    whole = [tok.bos_id, *tok.encode("abc" * 100), tok.eos_id, tok.bos_id, *tok.encode("xyz" * 50), tok.eos_id]
    assert train.tolist() + val.tolist() == whole
    assert len(val) == int(len(whole) * 0.2)
    info2 = prepare_corpus(src, tok, tmp_path / "out2", val_frac=0.2)
    assert np.array_equal(np.fromfile(info2.val_path, dtype=info2.dtype), val)


def test_empty_data_is_refused(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(UserError, match="holds no text"):
        prepare_corpus(str(f), char_tokenizer("ab"), tmp_path / "o")


def test_windows():
    tokens = np.arange(100, dtype=np.uint16)
    b = random_windows(tokens, 4, 10, np.random.default_rng(0))
    assert b.x.shape == (4, 10) and bool(b.mask.all())
    assert (b.y[:, :-1] == b.x[:, 1:]).all() and (b.y - b.x == 1).all()
    with pytest.raises(UserError, match="fewer than one window"):
        random_windows(tokens[:5], 1, 10, np.random.default_rng(0))
    # evaluation windows predict every token after the first exactly once
    seen = [y for batch in sequential_windows(tokens, 3, 16) for y in batch.y[batch.mask].tolist()]
    assert seen == list(range(1, 100))


def test_sft_mask_covers_completion_and_eos_only(tmp_path):
    tok = char_tokenizer("0123456789+=")
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"prompt": "1+2=", "completion": "3"}) + "\n" + json.dumps({"prompt": "10+20=", "completion": "30"}) + "\n")
    rows = read_sft(str(f), tok, block_size=32)
    b = sft_batch(rows, tok.pad_id)
    # row 0: bos 1 + 2 = 3 eos → inputs 6, targets "1+2=3<eos>"; trained targets: "3", eos
    assert b.y[0][b.mask[0]].tolist() == [*tok.encode("3"), tok.eos_id]
    assert b.y[1][b.mask[1]].tolist() == [*tok.encode("30"), tok.eos_id]
    assert b.mask.sum().item() == 5
    assert b.x[0, 0].item() == tok.bos_id


def test_sft_bad_rows(tmp_path):
    tok = char_tokenizer("ab")
    f = tmp_path / "s.jsonl"
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:1: SFT rows need string fields"):
        read_sft(str(f), tok, 8)
    f.write_text('{"prompt": "aaaaaaaaaa", "completion": "b"}\n')
    with pytest.raises(UserError, match="prompt alone fills the context"):
        read_sft(str(f), tok, 8)
