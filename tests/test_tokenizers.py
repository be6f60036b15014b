"""Tokenizers: exact round trips on any Unicode, stable ids, save/load, Hugging Face wrapping, errors."""

import functools
import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFJSON
from tokenizers import models, pre_tokenizers, processors

from pglm.errors import UserError
from pglm.tokenizers import (
    char_tokenizer,
    hf_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
    train_tokenizer,
)

# Any code point except surrogates (which cannot be UTF-8 encoded), with CJK and emoji drawn often.
ANY_CHAR = st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("今天天气很好，。😀👍🏽🇨🇳\n\t "))
ANY_TEXT = st.text(ANY_CHAR, max_size=40)
HARD = ["今天天气很好😀", "👨‍👩‍👧 family", "  two  spaces\r\n", "\x00\x7f\U0010ffff", "<eos> <pad>", "ÿ é ﷽", "𝔘𝔫𝔦"]

MIXED = ["the quick brown fox jumps over the lazy dog.\n", "今天天气很好，我们去公园散步。\n",
         "hello world, 你好世界! 123 + 456 = 579\n"] * 20


@functools.cache
def small_bpe():
    # One BPE for the whole module: training is the slow part.
    return train_tokenizer("bpe", iter(MIXED), vocab_size=300)


# --- char ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT.filter(bool))
@example("今天天气很好😀👍🏽")
def test_char_trained_on_text_round_trips(text):
    tok = train_tokenizer("char", [text])
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one id per code point
    assert min(ids) >= 4  # specials never appear in encode output
    assert tok.decode(ids) == text


def test_char_ids_are_by_frequency_then_token_and_cap_maps_rest_to_unk():
    # Counts: a=3, c=2, b=2, d=1. Ties (b, c) go by token, so b before c.
    tok = train_tokenizer("char", iter(["abca", "cab", "d"]), vocab_size=6)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 6
    assert tok.encode("abcd") == [4, 5, 3, 3]  # a=4, b=5; c and d were capped away
    assert tok.decode([1, 4, 5, 2, 0]) == "ab"
    assert tok.decode([1, 4, 3, 2], skip_special=False) == "<bos>a<unk><eos>"


def test_char_min_freq_drops_rare_characters():
    tok = train_tokenizer("char", ["aab"], min_freq=2)
    assert tok.vocab_size == 5
    assert tok.encode("ab") == [4, tok.unk_id]


def test_char_tokenizer_fixed_alphabet():
    tok = char_tokenizer("0123456789+=")
    assert tok.unk_id is None and tok.vocab_size == 3 + 12
    assert tok.encode("12+3=15") == [4, 5, 13, 6, 14, 4, 8]  # "0" is id 3, right after <eos>
    assert tok.decode(torch.tensor([1, 4, 5, 2])) == "12"
    assert tok.decode(np.array([13, 14])) == "+="
    with pytest.raises(UserError, match="'a' is not in the tokenizer's alphabet"):
        tok.encode("1a")
    with_unk = char_tokenizer("01", unk=True)
    assert with_unk.encode("0x") == [4, 3]


# --- word ---------------------------------------------------------------------------------------

WORDS = ["the cat sat on the mat", "The dog sat\non the log", "the end"]


def test_word_vocab_unknown_and_newline():
    tok = train_tokenizer("word", iter(WORDS))
    the, cat = tok.encode("the cat")
    assert the == 4  # "the" is the most frequent word
    assert tok.encode("the bird") == [the, tok.unk_id]
    ids = tok.encode("the cat\nsat  on\n\nthe mat\n")
    assert tok.decode(ids) == "the cat\nsat on\n\nthe mat\n"  # line structure kept, spaces collapsed
    assert tok.decode([1, the, cat, 2]) == "the cat"


def test_word_vocab_size_and_min_freq():
    tok = train_tokenizer("word", WORDS, vocab_size=6)  # 4 specials + "the", then "on"/"sat" (2 each, by token)
    assert tok.vocab_size == 6
    assert tok.decode(tok.encode("the on sat")) == "the on <unk>"
    rare = train_tokenizer("word", WORDS, min_freq=2)
    assert tok.unk_id in rare.encode("cat") and rare.encode("sat") != [rare.unk_id]


def test_word_lower_and_stopwords_only_when_asked():
    plain = train_tokenizer("word", WORDS)
    assert plain.encode("The") != plain.encode("the")  # case kept by default
    assert plain.encode("the cat") != plain.encode("cat")  # nothing removed by default

    lower = train_tokenizer("word", WORDS, lower=True)
    assert lower.encode("The") == lower.encode("the") != [lower.unk_id]

    stop = train_tokenizer("word", WORDS, lower=True, stopwords=["THE", "on"])
    assert "the" not in stop.tokens and "on" not in stop.tokens
    assert stop.encode("The cat on mat") == stop.encode("cat mat")


def test_word_zh_segments_and_decodes_without_spaces():
    text = "今天天气很好\n我们去公园"
    tok = train_tokenizer("word", [text], zh=True)
    assert len(tok.encode("今天天气很好")) > 1
    assert tok.decode(tok.encode(text)) == text


def test_word_zh_without_jieba_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'pglm\[zh\]'"):
        train_tokenizer("word", ["你好"], zh=True)


# --- bpe ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_bpe_round_trips_any_text(text):
    tok = small_bpe()
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)  # no specials added, all ids in range
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text


@pytest.mark.parametrize("text", HARD)
def test_bpe_round_trips_hard_cases(text):
    tok = small_bpe()
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "the fox"]) == [tok.encode(text), tok.encode("the fox")]


def test_bpe_specials_merges_and_skip():
    tok = small_bpe()
    assert (tok.kind, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == ("bpe", 0, 1, 2, None)
    assert 259 < tok.vocab_size <= 300  # 256 bytes + 3 specials, plus learned merges
    ids = tok.encode("the quick brown fox")
    assert len(ids) < len("the quick brown fox")  # merges were learned from the training text
    assert tok.decode([1, *ids, 2, 0, 0]) == "the quick brown fox"
    assert tok.decode([1, *ids, 2], skip_special=False) == "<bos>the quick brown fox<eos>"


def test_bpe_trains_from_a_single_text_iterator():
    tok = train_tokenizer("bpe", iter(["abab abab abab"]), vocab_size=270)
    assert tok.vocab_size > 259 and len(tok.encode("abab")) < 4


# --- save / load --------------------------------------------------------------------------------


def tiny_hf(tmp_path, config=None):
    """A WordLevel HF tokenizer whose post-processor appends <|endoftext|>, saved as tokenizer.json."""
    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "<unk>": 3, "</s>": 4, "<pad>": 5}
    tok = HFJSON(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def every_kind(tmp_path):
    return {
        "char": train_tokenizer("char", MIXED, vocab_size=30),
        "alphabet": char_tokenizer("0123456789+="),
        "word": train_tokenizer("word", WORDS, lower=True, stopwords=["on"]),
        "word-zh": train_tokenizer("word", ["今天天气很好"], zh=True),
        "bpe": small_bpe(),
        "hf": hf_tokenizer(tiny_hf(tmp_path)),
    }


@pytest.mark.parametrize("name", ["char", "alphabet", "word", "word-zh", "bpe", "hf"])
def test_save_load_round_trip(tmp_path, name):
    tok = every_kind(tmp_path)[name]
    path = tmp_path / "saved.json"
    tok.save(path)
    assert not (tmp_path / "saved.json.tmp").exists()
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok) and loaded.kind == tok.kind
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.unk_id) == (tok.pad_id, tok.bos_id, tok.eos_id,
                                                                         tok.unk_id)
    sample = "12+3=4" if name == "alphabet" else "hello world The cat on the 今天天气很好 😀\nfox"
    assert loaded.encode(sample) == tok.encode(sample)
    assert tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8"))).encode(sample) == tok.encode(sample)


def test_saved_file_is_readable_utf8(tmp_path):
    train_tokenizer("char", ["今天"]).save(tmp_path / "t.json")
    assert "今" in (tmp_path / "t.json").read_text(encoding="utf-8")  # not \u4eca


# --- hf -----------------------------------------------------------------------------------------


def test_hf_guesses_specials_and_adds_none(tmp_path):
    folder = tiny_hf(tmp_path)
    for tok in (hf_tokenizer(folder), hf_tokenizer(folder / "tokenizer.json"), load_tokenizer(folder)):
        assert tok.kind == "hf" and tok.vocab_size == 6
        assert tok.eos_id == 0  # <|endoftext|> comes first among the common names
        assert tok.bos_id == 0  # no <s>/<bos>: eos is reused
        assert tok.pad_id == 5 and tok.unk_id == 3
        assert tok.encode("hello world") == [1, 2]  # the post-processor's <|endoftext|> is not added
        assert tok.encode_batch(["hello", "world hello"]) == [[1], [2, 1]]
        assert tok.decode([1, 2, 0]) == "hello world"
        assert "<|endoftext|>" in tok.decode([1, 2, 0], skip_special=False)


def test_hf_reads_tokenizer_config(tmp_path):
    folder = tiny_hf(tmp_path, config={"eos_token": {"content": "</s>"}, "pad_token": "<|endoftext|>",
                                       "bos_token": None})
    tok = hf_tokenizer(folder)
    assert (tok.eos_id, tok.pad_id) == (4, 0)  # the config wins over the common names
    assert tok.bos_id == 0  # a null bos_token falls back to the names, and finds <|endoftext|>


def test_hf_without_pad_or_bos_uses_eos_and_without_eos_fails(tmp_path):
    HFJSON(models.WordLevel({"hi": 0, "</s>": 1}, unk_token="hi")).save(str(tmp_path / "tokenizer.json"))
    tok = hf_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id) == (1, 1, 1, None)
    HFJSON(models.WordLevel({"hi": 0}, unk_token="hi")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="no end-of-text token"):
        hf_tokenizer(tmp_path)


# --- errors -------------------------------------------------------------------------------------


def test_unknown_kind():
    with pytest.raises(UserError, match="unknown tokenizer 'xyz'; choose char, word, bpe or hf:PATH"):
        train_tokenizer("xyz", ["a"])
    with pytest.raises(UserError, match="unknown tokenizer 'xyz'"):
        tokenizer_from_dict({"pglm_tokenizer": 1, "kind": "xyz"})


def test_missing_or_corrupt_path(tmp_path):
    with pytest.raises(UserError, match="hf:.*nope: no tokenizer.json found at"):
        hf_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="no tokenizer.json found"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        hf_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_empty_training_text(kind):
    with pytest.raises(UserError, match="training text is empty"):
        train_tokenizer(kind, iter(["", ""]))


def test_bad_training_options():
    with pytest.raises(UserError, match="training text is empty"):
        train_tokenizer("word", ["the the"], stopwords=["the"])
    with pytest.raises(UserError, match="no token occurs min_freq=3 times"):
        train_tokenizer("char", ["aab"], min_freq=3)
    with pytest.raises(UserError, match="too small for bpe; use at least 259"):
        train_tokenizer("bpe", ["abc"], vocab_size=100)
    with pytest.raises(UserError, match="word tokenizer only"):
        train_tokenizer("char", ["abc"], lower=True)
