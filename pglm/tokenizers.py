"""Tokenizers: text <-> list of ids, in four kinds behind one small interface.

- `char`: one id per Unicode code point (Chinese and emoji included).
- `word`: whitespace words, or jieba words for Chinese (`zh=True`); "\\n" is a token of its own.
- `bpe`:  byte-level BPE trained with Hugging Face `tokenizers`; exact round trip of any text.
- `hf`:   a pretrained Hugging Face tokenizer.json, wrapped.

For char, word and bpe the special tokens come first: <pad>=0, <bos>=1, <eos>=2, then <unk>=3
where the kind has one. `encode` never adds special tokens; the caller places <bos>/<eos>.
Every tokenizer saves to one JSON file that rebuilds it with no other file.
"""

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerJSON
from tokenizers import decoders, models, pre_tokenizers, trainers

from pglm.errors import UserError

SPECIALS = ["<pad>", "<bos>", "<eos>"]
UNK = "<unk>"
FORMAT = 1  # the value of "pglm_tokenizer" in our JSON files


class Tokenizer:
    """The interface every kind provides. Subclasses set the attributes and the methods below."""

    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int | None  # None when every input has a token of its own (bpe, char without <unk>)
    # Whether a sequence starts with <bos>. Always for char/word/bpe; for a Hugging Face tokenizer, what
    # the tokenizer itself does (Llama: yes; GPT-2 and Qwen2: no), so a pretrained model sees its prompts
    # as it was trained on them.
    add_bos: bool = True
    chat_template: str | None = None  # a Hugging Face tokenizer's Jinja chat template, where it has one

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a prompt (or a document) starts a sequence with: <bos> where the tokenizer uses one
        (never twice: a chat template may write it already), then the text. Never empty."""
        ids = self.encode(text)
        if (self.add_bos and not (ids and ids[0] == self.bos_id)) or not ids:
            ids = [self.bos_id, *ids]
        return ids

    def render_chat(self, messages: list[dict]) -> str:
        """A conversation rendered by the tokenizer's chat template, ready for the assistant's turn.
        Only Hugging Face tokenizers carry one (HFTokenizer.render_chat)."""
        raise UserError(
            f"the {self.kind} tokenizer has no chat template, so rows with 'messages' cannot be rendered; "
            "use rows with a 'prompt' field, or a model whose tokenizer_config.json has a chat_template"
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special: bool = True) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, path) -> None:
        # Write then rename, so a crash mid-write never leaves a half-written tokenizer.json.
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)


def _id_list(tok: Tokenizer, ids, skip_special: bool) -> list[int]:
    """Ids as a plain list (from a list, a 1-D tensor or an array), without pad/bos/eos if asked."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if not skip_special:
        return ids
    special = {tok.pad_id, tok.bos_id, tok.eos_id}
    return [i for i in ids if i not in special]


class VocabTokenizer(Tokenizer):
    """Shared by char and word: a fixed list of tokens after the specials, looked up in a dict."""

    def __init__(self, tokens: list[str], unk: bool):
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, (3 if unk else None)
        self.tokens = list(tokens)  # the ordinary vocabulary, in id order
        self.id_to_token = SPECIALS + ([UNK] if unk else []) + self.tokens
        self.vocab_size = len(self.id_to_token)
        # Specials are kept out of the lookup: a literal "<eos>" in the text is ordinary text.
        n = self.vocab_size - len(self.tokens)
        self.token_to_id = {t: n + i for i, t in enumerate(self.tokens)}

    def _lookup(self, token: str) -> int:
        i = self.token_to_id.get(token, self.unk_id)
        if i is None:
            raise UserError(f"character {token!r} is not in the tokenizer's alphabet; add it to the alphabet")
        return i

    def _tokens_of(self, ids, skip_special: bool) -> list[str]:
        return [self.id_to_token[i] for i in _id_list(self, ids, skip_special)]


class CharTokenizer(VocabTokenizer):
    """One id per Unicode code point."""

    kind = "char"

    def encode(self, text: str) -> list[int]:
        return [self._lookup(c) for c in text]

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(self._tokens_of(ids, skip_special))

    def to_dict(self) -> dict:
        return {"pglm_tokenizer": FORMAT, "kind": self.kind, "chars": self.tokens, "unk": self.unk_id is not None}


class WordTokenizer(VocabTokenizer):
    """Whitespace words (or jieba words with `zh=True`); unknown words map to <unk>.

    `lower` and `stopwords` are off by default because they change the language being modelled:
    a model trained with them never sees capitals or the removed words, and cannot produce them.
    Stopwords are compared after lower-casing when `lower` is on. Decoding joins words with a space
    (zh: with nothing), so runs of whitespace come back as one space.
    """

    kind = "word"

    def __init__(self, words: list[str], zh: bool = False, lower: bool = False, stopwords: Iterable[str] = ()):
        super().__init__(words, unk=True)
        self.zh, self.lower = zh, lower
        self.stopwords = {w.lower() if lower else w for w in stopwords}
        self.cut = _jieba_cut() if zh else str.split

    def split(self, text: str) -> list[str]:
        """Text -> words, with "\\n" kept as a word so documents keep their line structure."""
        if self.lower:
            text = text.lower()
        words = []
        for n, line in enumerate(text.split("\n")):
            if n:
                words.append("\n")
            words += [w for w in self.cut(line) if w.strip() and w not in self.stopwords]
        return words

    def encode(self, text: str) -> list[int]:
        return [self._lookup(w) for w in self.split(text)]

    def decode(self, ids, skip_special: bool = True) -> str:
        out = ""
        for w in self._tokens_of(ids, skip_special):
            # A space between words, but none around a newline, at the start, or in Chinese.
            glue = "" if self.zh or not out or w == "\n" or out.endswith("\n") else " "
            out += glue + w
        return out

    def to_dict(self) -> dict:
        return {"pglm_tokenizer": FORMAT, "kind": self.kind, "words": self.tokens, "zh": self.zh,
                "lower": self.lower, "stopwords": sorted(self.stopwords)}


def _jieba_cut():
    try:
        import jieba
    except ImportError:
        raise UserError("the zh word tokenizer needs jieba; pip install 'pglm[zh]'") from None
    jieba.setLogLevel(logging.WARNING)  # otherwise it prints "Building prefix dict..." on first use
    return jieba.lcut


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` with the special ids pglm needs."""

    kind = "hf"

    def __init__(self, tok: HFTokenizerJSON, pad_id: int, bos_id: int, eos_id: int, unk_id: int | None,
                 add_bos: bool = True, chat_template: str | None = None):
        self.tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        self.add_bos, self.chat_template = add_bos, chat_template
        # Added tokens may sit above the model's own vocabulary, so size by the largest id.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(_id_list(self, ids, False), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            return super().render_chat(messages)  # the one-line error
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise UserError("rendering chat messages needs transformers; pip install 'pglm[hf]'") from None
        fast = PreTrainedTokenizerFast(
            tokenizer_object=self.tok, chat_template=self.chat_template, bos_token=self.decode([self.bos_id], False),
            eos_token=self.decode([self.eos_id], False),
        )
        try:
            return fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 — Jinja raises its own errors for malformed messages
            raise UserError(f"the chat template cannot render {str(messages)[:80]} ({e}); "
                            "messages are [{\"role\": \"user\", \"content\": \"...\"}, ...]") from None

    def to_dict(self) -> dict:
        return {"pglm_tokenizer": FORMAT, "kind": self.kind, "hf": json.loads(self.tok.to_str()),
                "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id,
                "add_bos": self.add_bos, "chat_template": self.chat_template}


class BPETokenizer(HFTokenizer):
    """Byte-level BPE: every string is bytes, so any text round-trips exactly and there is no <unk>."""

    kind = "bpe"

    def __init__(self, tok: HFTokenizerJSON):
        # A literal "<eos>" in the data is text, not a control token, so decode(encode(s)) == s holds
        # for every s. The flag is not saved in the HF JSON, hence set here on every build.
        tok.encode_special_tokens = True
        super().__init__(tok, pad_id=0, bos_id=1, eos_id=2, unk_id=None)

    def decode(self, ids, skip_special: bool = True) -> str:
        # Drop only pad/bos/eos ourselves, so the rule is the same as for char and word.
        return self.tok.decode(_id_list(self, ids, skip_special), skip_special_tokens=False)


def train_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int | None = None, zh: bool = False,
                    lower: bool = False, stopwords: Iterable[str] | None = None, min_freq: int = 1) -> Tokenizer:
    """Train a char, word or bpe tokenizer on `texts`, an iterator read once and never kept whole.

    `vocab_size` is the total size, specials included (None: keep every token; bpe: 4096). Tokens seen
    fewer than `min_freq` times are dropped. `zh`, `lower`, `stopwords`: word only (see WordTokenizer)."""
    if kind not in ("char", "word", "bpe"):
        raise UserError(f"unknown tokenizer {kind!r}; choose char, word, bpe or hf:PATH")
    if kind != "word" and (zh or lower or stopwords):
        raise UserError(f"zh, lower and stopwords apply to the word tokenizer only; drop them for {kind}")
    smallest = 256 + 3 if kind == "bpe" else 4 + 1  # bpe: every byte + specials; else specials + one
    if vocab_size is not None and vocab_size < smallest:
        raise UserError(f"vocab_size {vocab_size} is too small for {kind}; use at least {smallest}")

    empty = "the training text is empty: no tokens to build a vocabulary from; check the data path"

    if kind == "bpe":
        texts = iter(texts)
        first = next((t for t in texts if t), None)  # the trainer cannot tell us the corpus was empty
        if first is None:
            raise UserError(empty)
        # No normalizer and no post-processor: nothing is stripped or added, so the round trip is exact.
        tok = HFTokenizerJSON(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size or 4096, min_frequency=min_freq,
                                      special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(itertools.chain([first], texts), trainer)
        return BPETokenizer(tok)

    stopwords = list(stopwords or ())
    split = WordTokenizer([], zh, lower, stopwords).split if kind == "word" else list
    counts = Counter()
    for t in texts:
        counts.update(split(t))
    if not counts:  # also when stopwords removed every word
        raise UserError(empty)
    # Most frequent first, ties by token so the ids are the same on every run.
    keep = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    if not keep:
        raise UserError(f"no token occurs min_freq={min_freq} times in the training text; lower min_freq")
    keep = keep[: vocab_size - 4] if vocab_size else keep  # 4 specials: pad, bos, eos, unk
    return CharTokenizer(keep, unk=True) if kind == "char" else WordTokenizer(keep, zh, lower, stopwords)


def char_tokenizer(alphabet: str, unk: bool = False) -> Tokenizer:
    """A char tokenizer over a fixed alphabet, in the alphabet's order (e.g. "0123456789+=")."""
    return CharTokenizer(list(dict.fromkeys(alphabet)), unk=unk)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output."""
    if not isinstance(d, dict) or d.get("pglm_tokenizer") != FORMAT:
        raise UserError("not a pglm tokenizer (no \"pglm_tokenizer\": 1); pass a tokenizer.json saved by pglm")
    kind = d.get("kind")
    try:
        if kind == "char":
            return CharTokenizer(d["chars"], unk=d["unk"])
        if kind == "word":
            return WordTokenizer(d["words"], zh=d["zh"], lower=d["lower"], stopwords=d["stopwords"])
        if kind == "bpe":
            return BPETokenizer(HFTokenizerJSON.from_str(json.dumps(d["hf"])))
        if kind == "hf":
            tok = HFTokenizerJSON.from_str(json.dumps(d["hf"]))
            return HFTokenizer(tok, *(d[k] for k in ("pad_id", "bos_id", "eos_id", "unk_id")),
                               add_bos=d.get("add_bos", True), chat_template=d.get("chat_template"))
    except KeyError as e:
        raise UserError(f"{kind} tokenizer file lacks the key {e}; re-save it with pglm") from None
    raise UserError(f"unknown tokenizer {kind!r}; choose char, word, bpe or hf:PATH")


def _read_json(file: Path, label: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{label}: {file} is not valid JSON ({e}); re-save or re-download it") from None


def load_tokenizer(path) -> Tokenizer:
    """Load a pglm tokenizer.json, a Hugging Face tokenizer.json, or a directory holding either."""
    return _load(path, label=str(path))


def hf_tokenizer(path) -> Tokenizer:
    """What `--tokenizer hf:PATH` uses: a Hugging Face tokenizer.json or a directory with one.

    A pglm tokenizer.json is read as what it is, so the tokenizer of an earlier run works too."""
    return _load(path, label=f"hf:{path}")


def auto_tokenizer(path: str, trust_remote_code: bool = False) -> Tokenizer:
    """The tokenizer of a Hugging Face model: its tokenizer.json where the directory has one, else what
    `AutoTokenizer` makes of it (a hub id, or a model that ships only a slow tokenizer)."""
    if (Path(path) / "tokenizer.json").is_file():
        return hf_tokenizer(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("hf: models need transformers; pip install 'pglm[hf]'") from None
    try:
        auto = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"hf:{path}: no tokenizer can be loaded ({str(e).splitlines()[0]}); the directory needs "
                        "tokenizer.json or the files AutoTokenizer reads") from None
    if not auto.is_fast or auto.eos_token_id is None:
        raise UserError(f"hf:{path}: its tokenizer has no fast (tokenizer.json) form or no end-of-text token; "
                        "save it with a recent transformers so tokenizer.json is written")
    with_specials = auto("").input_ids
    bos = auto.bos_token_id
    return HFTokenizer(auto.backend_tokenizer, pad_id=auto.pad_token_id if auto.pad_token_id is not None else auto.eos_token_id,
                       bos_id=bos if bos is not None else auto.eos_token_id, eos_id=auto.eos_token_id,
                       unk_id=auto.unk_token_id, add_bos=bos is not None and with_specials[:1] == [bos],
                       chat_template=auto.chat_template if isinstance(auto.chat_template, str) else None)


def _load(path, label: str) -> Tokenizer:
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{label}: no tokenizer.json found at {path}; "
                        "pass a tokenizer.json file or a directory that holds one")
    d = _read_json(file, label)
    if isinstance(d, dict) and "pglm_tokenizer" in d:
        return tokenizer_from_dict(d)
    return _wrap_hf(file, d, label)


# Names tried, in order, when no tokenizer_config.json / special_tokens_map.json names the token.
_COMMON = {
    "eos_token": ["<|endoftext|>", "</s>", "<eos>", "<|im_end|>"],
    "bos_token": ["<s>", "<bos>", "<|endoftext|>"],
    "pad_token": ["<pad>", "<|pad|>"],
    "unk_token": ["<unk>", "[UNK]"],
}


def _wrap_hf(file: Path, d: dict, label: str) -> HFTokenizer:
    try:
        tok = HFTokenizerJSON.from_str(json.dumps(d))
    except Exception as e:  # the Rust side raises a bare Exception
        raise UserError(f"{label}: {file} is not a Hugging Face tokenizer.json ({e}); "
                        "pass the tokenizer.json of a Hugging Face model") from None

    config = {}  # both files are optional; tokenizer_config.json wins where they differ
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (file.parent / name).is_file():
            config.update(_read_json(file.parent / name, label))

    def special_id(key: str) -> int | None:
        named = config.get(key)
        named = named.get("content") if isinstance(named, dict) else named
        for name in ([named] if named else []) + _COMMON[key]:
            if tok.token_to_id(name) is not None:
                return tok.token_to_id(name)
        return None

    eos = special_id("eos_token")
    if eos is None:
        raise UserError(f"{label}: no end-of-text token found; name one as eos_token in tokenizer_config.json")
    bos = special_id("bos_token")
    pad = special_id("pad_token")
    # Does the tokenizer itself start a sequence with <bos>? tokenizer_config.json may say; otherwise its
    # post-processor shows it.
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        with_specials = tok.encode("", add_special_tokens=True).ids  # "": no token of the text can fail
        add_bos = bos is not None and bool(with_specials) and with_specials[0] == bos
    template = config.get("chat_template")
    if (file.parent / "chat_template.jinja").is_file():  # where transformers >= 4.51 saves it
        template = (file.parent / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    # Without a bos or pad token we reuse eos (as GPT-2 does). Reusing it as pad is safe because
    # pglm never derives attention or loss masks from the pad id.
    return HFTokenizer(tok, pad_id=eos if pad is None else pad, bos_id=eos if bos is None else bos,
                       eos_id=eos, unk_id=special_id("unk_token"), add_bos=bool(add_bos) and bos is not None,
                       chat_template=template)
