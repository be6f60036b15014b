"""`pglm export --format hf`: a gpt run as a LlamaForCausalLM directory that transformers loads as it is.

Checked against pglm itself: the same logits, the same greedy text, the same prompt ids from
AutoTokenizer as pglm's [<bos>, *encode(text)], and one clear line (exit 2) for each bad input.
"""

import json
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import error_line  # noqa: E402

from pglm.cli import main  # noqa: E402
from pglm.export import export_run, hf_tokenizer  # noqa: E402
from pglm.models import GPT, LSTMLM, ModelConfig  # noqa: E402
from pglm.sampling import generate  # noqa: E402
from pglm.tokenizers import WordTokenizer, char_tokenizer  # noqa: E402
from pglm.train.checkpoint import save_checkpoint, write_json  # noqa: E402

ASCII = "".join(chr(c) for c in range(32, 127)) + "\n\t"
CHINESE = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 200))  # 200 common-range CJK ideographs
ALPHABET = ASCII + CHINESE + "你好世界。，😀👍🏽é"
TEXTS = ["hello world", "你好，世界。\n世界", "emoji 😀👍🏽 and a literal <eos> <bos>", " leading\tspace  ", "é"]


def make_run(path, tok, *, arch="gpt", eos_after=None, **overrides):
    """A run directory with a random model whose logits are peaky (clear greedy choices).

    eos_after=(prompt ids, k): make <eos> the greedy choice wherever the k-th greedy token of that prompt
    would be, so that generation meets <eos> (its output row becomes 1.05 x that token's row)."""
    torch.manual_seed(0)
    if arch == "lstm":
        cfg = ModelConfig(arch="lstm", vocab_size=tok.vocab_size, n_layer=1, d_model=16, block_size=32)
        model = LSTMLM(cfg)
    else:
        cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, block_size=64,
                          **overrides)
        model = GPT(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or "norm_f" in name:
                    p.uniform_(0.5, 1.5)  # not all ones, so a misplaced norm weight shows
                elif p.dim() == 2:
                    p.normal_(0.0, 1.0 if "emb" in name else p.shape[1] ** -0.5)
            if not cfg.tie_embeddings:
                model.lm_head.weight.normal_(0.0, 1.0)  # logits about as spread as the tied model's
            if eos_after is not None:
                prompt, k = eos_after
                g = generate(model, [prompt], k + 1, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
                target = g.response_ids(0)[k]
                model.lm_head.weight[tok.eos_id] = 1.05 * model.lm_head.weight[target]
    path.mkdir(parents=True)
    write_json(path / "config.json", {"model": asdict(cfg)})
    tok.save(path / "tokenizer.json")
    save_checkpoint(path, 1, model)
    return path, model


def check_prompts_and_text(out, tok):
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = hf_tok(text).input_ids
        assert ids == [tok.bos_id, *tok.encode(text)], text
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids) == text
    return hf_tok


def check_same_model(out, model, tok, prompts):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, tok.vocab_size, (3, 20), generator=g)
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    assert diff <= 1e-4, diff

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    saw_eos = False
    for text in prompts:
        ids = hf_tok(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == [tok.bos_id, *tok.encode(text)]
        mine = generate(model, [ids[0].tolist()], 10, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
        theirs = hf.generate(ids, do_sample=False, max_new_tokens=10)[0, ids.shape[1]:].tolist()
        assert theirs == mine.response_ids(0), text  # both stop right after <eos>
        assert hf_tok.decode(theirs, skip_special_tokens=True) == tok.decode(mine.response_ids(0))
        saw_eos |= tok.eos_id in theirs
    return saw_eos


@pytest.mark.parametrize("tied", [False, True])
def test_char_gpt_round_trip(tmp_path, tied):
    tok = char_tokenizer(ALPHABET, unk=True)
    assert tok.vocab_size > 300
    prompts = ["hello", "你好", "a"]
    run, model = make_run(tmp_path / "run", tok, tie_embeddings=tied, rope_theta=500.0, norm_eps=1e-3,
                          eos_after=([tok.bos_id, *tok.encode(prompts[0])], 3))
    out = export_run(run, tmp_path / "hf")
    assert out == tmp_path / "hf"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tied
    assert config["rope_parameters"]["rope_theta"] == 500.0 and config["rms_norm_eps"] == 1e-3
    assert config["max_position_embeddings"] == 64
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    assert not list(tmp_path.glob(".hf*"))  # no temporary directory left beside it

    hf_tok = check_prompts_and_text(out, tok)
    ids = hf_tok("x\U0001F600y\u2603").input_ids
    assert ids == [1, *tok.encode("x\U0001F600y\u2603")] and ids[-1] == tok.unk_id  # ☃ is not in the alphabet
    # transformers counts <unk> as special: skip_special_tokens drops it, where pglm's decode shows it
    assert hf_tok.decode(ids, skip_special_tokens=True) == "x\U0001F600y"
    assert hf_tok.decode(ids[1:]) == tok.decode(ids[1:], skip_special=False) == "x\U0001F600y<unk>"
    assert check_same_model(out, model, tok, prompts)  # prompt 0 meets <eos>


def test_char_without_unk_refuses_unknown_characters_as_pglm_does(tmp_path):
    tok = char_tokenizer("abc ", unk=False)
    hf_tok = hf_tokenizer(tok, 32)
    assert hf_tok("ab c").input_ids == [1, *tok.encode("ab c")]
    with pytest.raises(Exception):  # noqa: B017 — tokenizers raises a bare Exception
        hf_tok("abz")


def test_bpe_run_from_the_cli(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("hello world, hello pglm. " * 40 + "你好，世界。😀\n" * 10)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--tokenizer", "bpe", "--vocab-size", "300", "--steps", "2",
                 "--out", str(run), "--model", "gpt", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
                 "--block-size", "32", "--batch-size", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", "--ckpt", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'hf'}: LlamaForCausalLM, ") and line.endswith("parameters, tokenizer bpe")

    from pglm.runs import load_run

    loaded = load_run(run)
    check_prompts_and_text(tmp_path / "hf", loaded.tokenizer)
    check_same_model(tmp_path / "hf", loaded.model, loaded.tokenizer, ["hello", "你好"])


def test_word_tokenizer(tmp_path):
    tok = WordTokenizer(["hello", "world", "\n", "你好"])
    hf_tok = hf_tokenizer(tok, 32)
    for text in ["hello world", "hello  world\n\n  hello\u3000x\x1cworld ", "\nhello", ""]:
        ids = hf_tok(text).input_ids
        assert ids == [1, *tok.encode(text)], text
        assert hf_tok.decode(ids[1:]) == tok.decode(ids[1:], skip_special=False)  # <unk> kept, pglm's spacing
    ids = hf_tok("hello\nworld  你好").input_ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids) == "hello\nworld 你好"
    lower = WordTokenizer(["hello", "world"], lower=True)
    assert hf_tokenizer(lower, 32)("Hello WORLD").input_ids == [1, *lower.encode("Hello WORLD")]


@pytest.mark.parametrize("with_bos", [True, False])
def test_hf_kind_tokenizer(tmp_path, with_bos):
    """A gpt trained with --tokenizer hf:PATH: its tokenizer is exported with pglm's prompt rule."""
    from tokenizers import processors

    from pglm.tokenizers import hf_tokenizer as load_hf_tokenizer
    from pglm.tokenizers import train_tokenizer

    raw = train_tokenizer("bpe", ["hello world, 你好 😀 " * 20], vocab_size=280).tok
    if with_bos:  # like Llama: the tokenizer itself starts a sequence with <bos>
        raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_hf_tokenizer(tmp_path / "tokenizer.json")
    assert tok.kind == "hf"
    hf_tok = hf_tokenizer(tok, 32)
    for text in ["hello world", "你好 😀", "  x\n"]:
        prompt = tok.prompt_ids(text) if hasattr(tok, "prompt_ids") else [tok.bos_id, *tok.encode(text)]
        assert hf_tok(text).input_ids == prompt
        assert hf_tok.decode(prompt, skip_special_tokens=True) == tok.decode(prompt) == text


def test_bad_inputs_are_one_line(tmp_path, capsys):
    tok = char_tokenizer(ASCII, unk=True)
    run, _ = make_run(tmp_path / "run", tok)
    lstm, _ = make_run(tmp_path / "lstm", tok, arch="lstm")
    assert "no Hugging Face equivalent" in error_line(capsys, ["export", "--ckpt", str(lstm), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()

    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "x.txt").write_text("x")
    assert "not a pglm run" in error_line(capsys, ["export", "--ckpt", str(tmp_path / "notrun"), "--out", str(tmp_path / "o")])
    assert "--format onnx" in error_line(capsys, ["export", "--ckpt", str(run), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert "--merge-lora" in error_line(capsys, ["export", "--ckpt", str(run), "--merge-lora", "--out", str(tmp_path / "o")])

    # --out holds files: refused without --overwrite, and with it unless they are an earlier export
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert "--overwrite" in error_line(capsys, ["export", "--ckpt", str(run), "--out", str(busy)])
    assert "not an earlier export" in error_line(capsys, ["export", "--ckpt", str(run), "--out", str(busy), "--overwrite"])
    assert "holds the model being exported" in error_line(capsys, ["export", "--ckpt", str(run), "--out", str(run), "--overwrite"])
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (busy / "notes.txt").read_text() == "keep me"

    lstm_tok = WordTokenizer(["a"], zh=True)
    with pytest.raises(Exception, match="jieba"):
        hf_tokenizer(lstm_tok, 32)
    with pytest.raises(Exception, match="stopwords"):
        hf_tokenizer(WordTokenizer(["a"], stopwords=["the"]), 32)


def test_overwrite_replaces_an_export_and_a_failure_keeps_it(tmp_path, capsys, monkeypatch):
    tok = char_tokenizer(ASCII, unk=True)
    run, _ = make_run(tmp_path / "run", tok)
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(run), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    (out / "marker").write_text("old")
    assert "--overwrite" in error_line(capsys, ["export", "--ckpt", str(run), "--out", str(out)])
    assert (out / "marker").read_text() == "old" and (out / "model.safetensors").read_bytes() == before

    import pglm.export

    def broken(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pglm.export, "gpt_state_dict", broken)
    with pytest.raises(RuntimeError):
        export_run(run, out, overwrite=True)
    assert (out / "marker").read_text() == "old" and (out / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary directories left

    assert main(["export", "--ckpt", str(run / "checkpoints" / "step_1"), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").read_bytes() == before
    assert "tokenizer char" in capsys.readouterr().out
