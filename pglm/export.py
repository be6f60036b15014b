"""`pglm export`: a run as a Hugging Face `LlamaForCausalLM` directory that `transformers` loads as it is.

    DIR/config.json              LlamaConfig (save_pretrained), architectures ["LlamaForCausalLM"]
    DIR/model.safetensors        the weights under Llama's names
    DIR/generation_config.json   bos/eos/pad ids
    DIR/tokenizer.json           a `tokenizers` tokenizer that gives pglm's ids
    DIR/tokenizer_config.json    for PreTrainedTokenizerFast (AutoTokenizer), specials named
    DIR/special_tokens_map.json  the same specials, for older readers

    model = AutoModelForCausalLM.from_pretrained(DIR)      # no trust_remote_code
    tok = AutoTokenizer.from_pretrained(DIR)

What a transformers user should know:

- Prompts. pglm feeds a model `[<bos>, *encode(text)]` and never adds <eos>. The exported tokenizer does
  the same: its post-processor prepends <bos>, so `tok(text).input_ids` is exactly pglm's prompt, and
  `tok(text, add_special_tokens=False)` is `encode(text)`. (An hf: tokenizer that uses no <bos>, such as
  GPT-2's, gets a post-processor that adds nothing, as pglm adds nothing for it. One difference: where the
  text of an hf: tokenizer itself encodes to <bos> first, as a chat template may write, pglm adds no
  second <bos> and transformers does; such prompts go in with `add_special_tokens=False`.)
  Generation stops at <eos> (generation_config); `tok.decode(ids, skip_special_tokens=True)` drops
  <pad>/<bos>/<eos> as pglm's decode does.
- Literal special strings. For char, word and bpe tokenizers a literal "<eos>" in the text is ordinary
  text in pglm; the export keeps that with `split_special_tokens: true` in tokenizer_config.json. An
  `hf:` tokenizer is exported as pglm uses it (special strings in the text are special tokens).
- <unk>. transformers counts <unk> as a special token, so `decode(..., skip_special_tokens=True)` drops
  it where pglm's decode shows "<unk>"; decode without skipping to see it.
- Tokenizer kinds. char: one token per Unicode code point (a WordLevel vocabulary of pglm's ids, split
  on every code point, decoded by concatenation); characters outside the alphabet become <unk> when the
  tokenizer has one and are an encoding error otherwise, as in pglm. word: whitespace words with "\\n"
  as a word of its own, decoded with pglm's spacing; `lower` maps to the Lowercase normalizer. Word
  tokenizers with stopwords and Chinese (jieba) word tokenizers are refused: neither can be written in a
  tokenizer.json. bpe and hf: the run's own Hugging Face tokenizer, with the <bos> post-processor above.
- Context. max_position_embeddings is the run's block_size: the rotary tables of the pglm model stop
  there, and quality beyond it is unknown (transformers does not stop you).
- Rotary pairs. pglm rotates channel pairs (i, i + D/2), as Llama does, so q and k are not permuted.
- Version. The directory is written by and for transformers >= 5 (rope settings are stored as
  `rope_parameters`); transformers 4.x would read the rotary base as the default 10000.
- --merge-lora concerns hf:... runs with LoRA adapters; a gpt run has none, and passing it is an error.

Everything is written to a temporary sibling directory and renamed into place; an existing --out is
replaced only with --overwrite, and only when it holds an earlier export (a config.json) rather than
unrelated files or the run itself. If the export fails, what was there before is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pglm.errors import UserError
from pglm.train.checkpoint import write_json

ARCHITECTURE = "LlamaForCausalLM"


@dataclass
class ExportSummary:
    out: Path
    architecture: str  # config.json's architectures[0]
    n_params: int  # tensors in the safetensors files; a tied embedding counts once
    tokenizer_kind: str  # the pglm tokenizer kind (char, word, bpe, hf)


def export_run(path, out_dir, merge_lora: bool = False, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write the run (or checkpoint) at `path` as a Hugging Face model directory `out_dir`; return it."""
    return export_run_summary(path, out_dir, merge_lora=merge_lora, overwrite=overwrite,
                              trust_remote_code=trust_remote_code).out


def export_run_summary(path, out_dir, merge_lora: bool = False, overwrite: bool = False,
                       trust_remote_code: bool = False) -> ExportSummary:
    """`export_run`, returning what was written (for the one line the CLI prints)."""
    from pglm.runs import load_run

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("pglm export needs transformers; pip install 'pglm[hf]'") from None
    run = load_run(path, trust_remote_code=trust_remote_code)
    reward = run.config.get("command") == "reward"
    if reward:  # the language model and its scalar head
        from pglm.runs import load_reward_model

        run = load_reward_model(path, trust_remote_code=trust_remote_code)
    arch = run.config["model"].get("arch")
    if arch == "lstm":
        raise UserError("an LSTM has no Hugging Face equivalent; export works for gpt models and hf:... models")
    if arch not in ("gpt", "hf"):
        raise UserError(f"cannot export a model of kind {arch!r}; export works for gpt models and hf:... models")
    if arch == "gpt" and merge_lora:
        raise UserError("--merge-lora applies to hf:... runs with LoRA adapters; a gpt run has none, drop it")
    # What must never be overwritten: the run directory, or the model directory of an hf:PATH.
    source = run.run_dir if run.run_dir is not None else Path(str(run.ckpt_dir).removeprefix("hf:"))
    out = _check_out(Path(out_dir), source, overwrite)
    with _written_in_place(out) as tmp:
        if reward:
            export_reward_run(run, tmp)
        elif arch == "gpt":
            export_gpt_run(run, tmp)
        else:
            export_hf_run(run, tmp, merge_lora)
        summary = _summarise(tmp, out, run.tokenizer.kind)
    return summary


def export_hf_run(run, tmp_dir: Path, merge_lora: bool) -> None:
    """Write an hf:... run as a model directory in tmp_dir: the transformers model as it is, or, for a
    LoRA run, the adapter in peft's format (adapter_config.json names the base model), or with
    --merge-lora the base with the adapter merged into its weights (Hu et al. 2021: W + α/r·BA)."""
    model = run.model
    if merge_lora and not model.is_lora:
        raise UserError("--merge-lora: this run has no LoRA adapter; drop --merge-lora")
    if model.is_lora and merge_lora:
        import copy

        copy.deepcopy(model.net).merge_and_unload().save_pretrained(tmp_dir)  # a copy: the run stays as it is
    elif model.is_lora:
        # adapter_config.json names the base the adapter goes on: the hf:PATH the run started from
        model.net.peft_config["default"].base_model_name_or_path = model.config.source.removeprefix("hf:")
        model.net.save_pretrained(tmp_dir)  # adapter_config.json + adapter_model.safetensors
    else:
        model.inner.save_pretrained(tmp_dir)
    tok = hf_tokenizer(run.tokenizer, model.config.block_size)
    tok.save_pretrained(tmp_dir)
    write_json(tmp_dir / "special_tokens_map.json", tok.special_tokens_map)


def export_reward_run(run, tmp_dir: Path) -> None:
    """Write a reward run as an `AutoModelForSequenceClassification` directory with one label: a gpt
    body as LlamaForSequenceClassification, an hf: body as its own *ForSequenceClassification
    (a LoRA adapter merged in). Both read the last token that is not <pad>, as pglm's RewardModel
    reads the last real token, and their `score` is a linear map without bias, as pglm's head."""
    from safetensors.torch import save_file

    rm, tok = run.model, run.tokenizer
    body, cfg = rm.model, rm.config
    hf_tok = hf_tokenizer(tok, cfg.block_size)
    head = rm.score.weight.detach().cpu().clone()  # (1, C)
    if cfg.arch == "gpt":
        tensors = {k: v for k, v in gpt_state_dict(body).items() if k != "lm_head.weight"}
        config = llama_config(cfg, tok, tensors["model.embed_tokens.weight"].dtype)
        config.architectures, config.num_labels, config.tie_word_embeddings = ["LlamaForSequenceClassification"], 1, False
        config.save_pretrained(tmp_dir)
        save_file({**tensors, "score.weight": head}, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        import copy

        from transformers import AutoModelForSequenceClassification

        causal = copy.deepcopy(body.net).merge_and_unload() if body.is_lora else body.inner  # a copy: the run stays
        config = copy.deepcopy(causal.config)
        config.num_labels, config.pad_token_id = 1, tok.pad_id
        config.architectures = None
        classifier = AutoModelForSequenceClassification.from_config(config)
        classifier.base_model.load_state_dict(causal.base_model.state_dict())
        classifier.score.weight.data.copy_(head.to(classifier.score.weight.dtype))
        classifier.save_pretrained(tmp_dir)
    hf_tok.save_pretrained(tmp_dir)
    write_json(tmp_dir / "special_tokens_map.json", hf_tok.special_tokens_map)


# ---- the output directory: checked first, written aside, renamed into place ----


def _check_out(out: Path, source: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace an earlier export, or choose "
                        "an empty or new directory")
    here = out.resolve()
    if here == source.resolve() or here in source.resolve().parents:
        raise UserError(f"--out {out} holds the model being exported; choose another directory")
    earlier = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    if (out / "checkpoints").is_dir() or not earlier:
        raise UserError(f"--out {out} holds files that are not an earlier export; --overwrite replaces only "
                        "an exported model, so choose an empty or new directory")
    return out


@contextlib.contextmanager
def _written_in_place(out: Path):
    """A temporary sibling of `out` to write into; on success it replaces `out`, on failure it goes away."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is a directory like any other
    try:
        yield tmp
        aside = None
        if out.exists():
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-")) / out.name
            os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            if aside is not None:
                os.replace(aside, out)
            raise
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summarise(tmp: Path, out: Path, kind: str) -> ExportSummary:
    if not (tmp / "config.json").is_file():  # a LoRA adapter alone
        return ExportSummary(out, "LoRA adapter (peft)", _count(tmp), kind)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    return ExportSummary(out, (config.get("architectures") or ["?"])[0], _count(tmp), kind)


def _count(tmp: Path) -> int:
    from safetensors import safe_open

    n = 0
    for file in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                n += _numel(f.get_slice(name).get_shape())
    return n


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- gpt -> LlamaForCausalLM ----


def export_gpt_run(run, out: Path) -> None:
    """Write a pglm gpt run's model, config, generation config and tokenizer into `out`."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    cfg, tok = run.model.config, run.tokenizer
    hf_tok = hf_tokenizer(tok, cfg.block_size)  # first: a tokenizer that cannot be exported fails early
    tensors = gpt_state_dict(run.model)
    dtype = tensors["model.embed_tokens.weight"].dtype
    llama_config(cfg, tok, dtype).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(out)
    hf_tok.save_pretrained(out)
    write_json(out / "special_tokens_map.json", hf_tok.special_tokens_map)


def llama_config(cfg, tok, dtype=torch.float32):
    """The LlamaConfig of a pglm gpt ModelConfig (n_kv_heads = n_head, no biases, SwiGLU, RMSNorm)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=[ARCHITECTURE],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=float(cfg.norm_eps),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=bool(cfg.tie_embeddings),
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        dtype=str(dtype).removeprefix("torch."),
    )


def gpt_state_dict(model) -> dict[str, torch.Tensor]:
    """pglm GPT parameters under LlamaForCausalLM's names; own, contiguous CPU tensors (no shared memory).

    lm_head.weight is left out when it is tied to the embedding (tie_word_embeddings rebuilds it)."""
    cpu = ((k, v.detach().to("cpu")) for k, v in model.state_dict().items())
    return {name: t.clone().contiguous() for name, t in llama_named(model.config, cpu)}  # own: safetensors refuses views


# pglm GPT block names → Llama's; the fused q, k, v projection is split by `llama_named`
_LLAMA_BLOCK = {"attn.o_proj.weight": "self_attn.o_proj.weight", "attn_norm.weight": "input_layernorm.weight",
                "mlp_norm.weight": "post_attention_layernorm.weight",
                **{f"mlp.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}}


def llama_named(cfg, named_tensors):
    """(LlamaForCausalLM name, tensor) for each given (pglm GPT name, tensor), one at a time, as views:
    what a weight sync streams into an engine that loads Llama checkpoints (vLLM). lm_head.weight is
    left out when it is tied to the embedding (tie_word_embeddings rebuilds it)."""
    C = cfg.d_model
    top = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    for name, t in named_tensors:
        if name in top:
            if not (name == "lm_head.weight" and cfg.tie_embeddings):
                yield top[name], t
            continue
        _, i, rest = name.split(".", 2)  # blocks.{i}.{rest}
        dst = f"model.layers.{i}."
        if rest == "attn.qkv.weight":  # (3C, C): rows of q, then k, then v
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                yield dst + f"self_attn.{proj}.weight", t[j * C : (j + 1) * C]
        else:
            yield dst + _LLAMA_BLOCK[rest], t


# ---- tokenizers ----


def hf_tokenizer(tok, model_max_length: int):
    """A `PreTrainedTokenizerFast` whose `tok(text).input_ids` is pglm's `[bos, *tok.encode(text)]`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if tok.kind == "char":
        backend, names, split_special = _char_backend(tok), tok.id_to_token, True
    elif tok.kind == "word":
        backend, names, split_special = _word_backend(tok), tok.id_to_token, True
    elif tok.kind in ("bpe", "hf"):
        from tokenizers import Tokenizer as HFTokenizerJSON

        backend = HFTokenizerJSON.from_str(tok.tok.to_str())  # a copy: the run's tokenizer stays as it is
        names = [None] * tok.vocab_size
        for name, i in backend.get_vocab(with_added_tokens=True).items():
            names[i] = name
        # pglm's bpe reads literal special strings as text; hf tokenizers are used as they come.
        split_special = tok.kind == "bpe"
    else:
        raise UserError(f"a {tok.kind!r} tokenizer cannot be exported; export works for char, word, bpe and hf")

    bos, eos, pad = names[tok.bos_id], names[tok.eos_id], names[tok.pad_id]
    unk = None if tok.unk_id is None else names[tok.unk_id]
    # pglm's prompts are <bos> text (hf tokenizers that use no <bos>: the text alone), with no <eos> added:
    # generation continues the text.
    if getattr(tok, "add_bos", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    extra = {"chat_template": tok.chat_template} if getattr(tok, "chat_template", None) else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        split_special_tokens=split_special, clean_up_tokenization_spaces=False, model_max_length=model_max_length,
        **extra,
    )


def _vocab_backend(tok, unk):
    """A WordLevel tokenizer over pglm's id_to_token, specials registered as special tokens."""
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizerJSON

    vocab = {t: i for i, t in enumerate(tok.id_to_token)}
    backend = HFTokenizerJSON(models.WordLevel(vocab, unk_token=unk))
    n_special = tok.vocab_size - len(tok.tokens)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.id_to_token[:n_special]])
    return backend


def _char_backend(tok):
    from tokenizers import Regex, decoders, pre_tokenizers

    # WordLevel needs an unk name even when there is none; a name outside the vocabulary makes an unknown
    # character an encoding error, as in pglm.
    backend = _vocab_backend(tok, "<unk>" if tok.unk_id is not None else "<no unk: not in the alphabet>")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point
    backend.decoder = decoders.Fuse()  # concatenation, nothing between pieces
    return backend


def _word_backend(tok):
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    if tok.zh:
        raise UserError("a Chinese (jieba) word tokenizer cannot be written as a tokenizer.json; export works "
                        "for char, bpe, hf and whitespace word tokenizers")
    if tok.stopwords:
        raise UserError("a word tokenizer with stopwords cannot be written as a tokenizer.json; export works for "
                        "char, bpe, hf and whitespace word tokenizers without stopwords")
    backend = _vocab_backend(tok, "<unk>")
    if tok.lower:
        backend.normalizer = normalizers.Lowercase()
    # A word is a run of characters that Python's str.split() does not split on; "\n" is a word of its own.
    space = "".join(f"\\x{{{ord(c):X}}}" for c in map(chr, range(sys.maxunicode + 1)) if c.isspace() and c != "\n")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"\\n|[^\\n{space}]+"), behavior="removed", invert=True)
    # pglm's spacing: one space between words, none at the start or on either side of a newline.
    backend.decoder = decoders.Sequence([
        decoders.Replace(Regex("^"), " "), decoders.Fuse(), decoders.Replace(" \n", "\n"),
        decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0),
    ])
    return backend
