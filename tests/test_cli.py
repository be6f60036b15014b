"""The command line: the run-directory contract, and one clear line (exit 2) for each kind of bad input."""

import json
import subprocess
import sys

import pytest

from pglm.cli import main

TINY = ["--model", "gpt", "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--block-size", "32",
        "--batch-size", "4", "--eval-every", "5", "--ckpt-every", "5", "--log-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny pretraining run shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "d.txt"
    data.write_text("hello world, hello pglm. " * 60 + "你好，世界。\n")
    out = tmp / "run"
    assert main(["pretrain", "--data", str(data), "--tokenizer", "char", "--steps", "10", "--out", str(out), *TINY]) == 0
    return out


def error_line(capsys, code, argv):
    """Run argv; check it fails with exit 2 and exactly one stderr line, no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_run_directory_contract(run):
    assert json.loads((run / "config.json").read_text())["model"]["arch"] == "gpt"
    assert (run / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_10"
    for step in (5, 10):
        assert (run / "checkpoints" / f"step_{step}" / "model.safetensors").is_file()
        assert (run / "checkpoints" / f"step_{step}" / "optimizer.pt").is_file()
        assert json.loads((run / "checkpoints" / f"step_{step}" / "state.json").read_text())["step"] == step
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "phase", "time"} <= r.keys() for r in rows)
    mle = [r for r in rows if r["phase"] == "mle"]
    assert [r["step"] for r in mle] == list(range(1, 11))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in mle)
    evals = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    assert all({"val_loss", "val_ppl", "val_token_acc"} <= r.keys() for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(evals[-1]["val_ppl"])
    assert (run / "plots" / "loss.png").stat().st_size > 1000


def test_eval_generate_and_sft_from_a_run(run, tmp_path, capsys):
    data = tmp_path / "e.txt"
    data.write_text("hello world, hello pglm. " * 5)
    assert main(["eval", "--ckpt", str(run), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_tokens"] == 5 * 25 + 1 and result["val_ppl"] > 1  # bos + text + eos: every token after bos
    assert main(["generate", "--ckpt", str(run / "checkpoints" / "step_5"), "--prompt", "hello", "--max-new-tokens", "8",
                 "--num-samples", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 3 and out.count("hello") >= 3
    sft = tmp_path / "s.jsonl"
    sft.write_text("".join(json.dumps({"prompt": "hello ", "completion": w}) + "\n" for w in ["world", "pglm"] * 10))
    assert main(["sft", "--data", str(sft), "--init", str(run), "--steps", "3", "--out", str(tmp_path / "sft"),
                 "--batch-size", "4", "--quiet"]) == 0
    assert (tmp_path / "sft" / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert main(["plot", str(tmp_path / "sft")]) == 0


def test_missing_and_empty_data(tmp_path, capsys):
    line = error_line(capsys, 2, ["pretrain", "--data", str(tmp_path / "nope.txt"), "--steps", "1", "--out", str(tmp_path / "o")])
    assert "no such file" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = error_line(capsys, 2, ["pretrain", "--data", str(empty), "--steps", "1", "--out", str(tmp_path / "o")])
    assert "empty.txt" in line
    assert not (tmp_path / "o").exists()  # a run that never started leaves nothing behind


def test_non_utf8_names_file_and_offset(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\n\xff\xfe")
    line = error_line(capsys, 2, ["pretrain", "--data", str(bad), "--steps", "1", "--out", str(tmp_path / "o")])
    assert "bad.txt" in line and "offset 4" in line and "UTF-8" in line


def test_unknown_model_and_tokenizer(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("abc " * 100)
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--model", "rnn", "--steps", "1", "--out", str(tmp_path / "o")])
    assert "unknown model 'rnn'" in line and "gpt" in line
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--tokenizer", "sentencepiece", "--steps", "1", "--out", str(tmp_path / "o")])
    assert "unknown tokenizer" in line
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--size", "huge", "--steps", "1", "--out", str(tmp_path / "o")])
    assert "huge" in line
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--out", str(tmp_path / "o")])
    assert "--steps" in line
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o"), "--bogus-flag"])
    assert "--bogus-flag" in line


def test_prompt_longer_than_context(run, capsys):
    line = error_line(capsys, 2, ["generate", "--ckpt", str(run), "--prompt", "x" * 100])
    assert "context is 32" in line


def test_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    line = error_line(capsys, 2, ["eval", "--ckpt", str(tmp_path), "--data", "builtin:python-docs"])
    assert "not a pglm run or checkpoint" in line


def test_truncated_safetensors(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    f = copy / "checkpoints" / "step_10" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    line = error_line(capsys, 2, ["generate", "--ckpt", str(copy), "--prompt", "hi"])
    assert "damaged or incomplete" in line and "step_10" in line


def test_out_that_already_holds_a_run_is_not_touched(run, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = error_line(capsys, 2, ["pretrain", "--data", "builtin:python-docs", "--steps", "1", "--out", str(run), *TINY])
    assert "already holds a run" in line and "--resume" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pglm", "eval", "--ckpt", str(tmp_path), "--data", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pglm eval: error:")


def test_chat_continues_each_line_until_end_of_input(run, monkeypatch, capsys):
    lines = iter(["hello", "world"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--ckpt", str(run), "--max-new-tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pglm chat with")
    assert len(out) >= 3  # the banner, then one continuation per line typed


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    data = tmp_path / "d.txt"
    data.write_text("abc " * 100)
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o"),
                                  "--tensorboard", *TINY])
    assert "pip install 'pglm[tb]'" in line
    assert not (tmp_path / "o").exists()  # no half run left behind to trip a later --resume


def test_overwrite_that_fails_puts_the_old_run_back(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\xff")
    line = error_line(capsys, 2, ["pretrain", "--data", str(bad), "--steps", "1", "--out", str(copy), "--overwrite", *TINY])
    assert "not UTF-8" in line
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".copy.*"))  # no backup left lying around


def test_prepare_then_overwrite(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("some text " * 50)
    out = tmp_path / "prep"
    assert main(["prepare", "--data", str(data), "--out", str(out)]) == 0
    assert "already holds a run" in error_line(capsys, 2, ["prepare", "--data", str(data), "--out", str(out)])
    assert main(["prepare", "--data", str(data), "--out", str(out), "--overwrite"]) == 0
    assert (out / "train.bin").stat().st_size > 0 and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--eval-every", "0"), ("--ckpt-every", "0"),
                                         ("--log-every", "0"), ("--lr", "-1")])
def test_bad_numbers_are_one_line(tmp_path, capsys, flag, value):
    data = tmp_path / "d.txt"
    data.write_text("abc " * 100)
    line = error_line(capsys, 2, ["pretrain", "--data", str(data), "--steps", "2", "--out", str(tmp_path / "o"),
                                  *TINY, flag, value])
    assert flag in line


def test_eval_of_a_missing_jsonl_is_one_line(run, tmp_path, capsys):
    assert "no such file" in error_line(capsys, 2, ["eval", "--ckpt", str(run), "--data", str(tmp_path / "x.jsonl")])
