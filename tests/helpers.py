"""Shared by the test modules."""

from pglm.cli import main

# A one-layer GPT small enough for a test to train in a second or two.
TINY = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "8", "--quiet"]


def tiny_sft_runs(tmp):
    """TMP/gpt and TMP/lstm: two-step add2 SFT runs of TINY models, to start policy gradient from."""
    for arch in ("gpt", "lstm"):
        assert main(["sft", "--task", "add2", "--model", arch, "--steps", "2", "--out", str(tmp / arch), *TINY]) == 0
    return tmp


def error_line(capsys, argv):
    """Run argv; check it fails with exit 2 and exactly one stderr line, no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err
