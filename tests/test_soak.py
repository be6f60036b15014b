"""Preemption soak: runs stopped at random moments by SIGKILL, SIGTERM or SIGINT, each time continued
(`--resume` once a checkpoint exists, else the same command again), end with the very weights of a
run never stopped. Slow: `pytest -m slow tests/test_soak.py`."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pglm.cli import main

TINY = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--block-size", "16", "--quiet"]
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def weights(run):
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def default_signals() -> None:
    """In the child, SIGINT and SIGTERM as a shell would leave them: an ignored SIGINT is inherited
    across exec, and a test run earlier in this pytest process may have left one ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def soak(argv: list[str], out, interruptions: int, rng: random.Random, log: list) -> None:
    """Run `argv --out out` until it has finished (summary.json written), stopping it `interruptions`
    times at random moments; after each stop the next start is `--resume` once a checkpoint exists,
    else the same command again."""
    done = 0
    while not (out / "summary.json").is_file():
        if (out / "checkpoints" / "latest").is_file():
            cmd = [argv[0], "--out", str(out), "--resume", "--quiet"]
        else:
            cmd = [*argv, "--out", str(out)]
        p = subprocess.Popen([sys.executable, "-m", "pglm", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=default_signals)
        sig = None
        if done < interruptions:
            time.sleep(rng.uniform(0.5, 3.0))  # start-up (imports, set-up) takes about 2 s of it
            if p.poll() is None:
                sig = rng.choice(SIGNALS)
                p.send_signal(sig)
                done += 1
        err = p.communicate(timeout=300)[1]
        # Python's own report of a Ctrl-C that lands while it is still importing is a traceback too
        assert "Traceback" not in err or "KeyboardInterrupt" in err, err
        latest = out / "checkpoints" / "latest"
        log.append((sig.name if sig else None, p.returncode, latest.read_text().strip() if latest.is_file() else None))
        assert p.returncode == 0 or (sig is not None and p.returncode in (130, -signal.SIGKILL, -signal.SIGTERM,
                                                                          -signal.SIGINT)), (log, err)
    assert done >= interruptions, f"the run ended after {done} interruptions: make it longer"


@pytest.mark.slow
def test_random_kills_and_signals_never_change_the_result(tmp_path):
    rng = random.Random(0)
    text = tmp_path / "d.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert main(["sft", "--task", "add2", "--steps", "20", "--batch-size", "8", "--out", str(tmp_path / "init"),
                 *TINY]) == 0
    jobs = {
        "pretrain": ["pretrain", "--data", str(text), "--steps", "4000", "--batch-size", "64", "--ckpt-every", "50",
                     "--eval-every", "2000", *TINY],
        "rl": ["rl", "--init", str(tmp_path / "init"), "--task", "add2", "--algo", "ppo", "--beta", "0.05",
               "--steps", "600", "--prompts-per-step", "4", "--group-size", "2", "--ckpt-every", "3",
               "--eval-every", "100", "--eval-samples", "0", "--eval-limit", "20", "--quiet"],
    }
    report = {}
    for name, argv in jobs.items():
        straight = tmp_path / f"{name}-straight"
        assert main([*argv, "--out", str(straight)]) == 0
        log: list = []
        soak(argv, tmp_path / f"{name}-soaked", 15, rng, log)
        a, b = weights(straight), weights(tmp_path / f"{name}-soaked")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical
        report[name] = log
    (tmp_path / "soak.json").write_text(json.dumps(report))
    print(json.dumps({k: [x[:2] for x in v] for k, v in report.items()}))
    assert sum(len(v) for v in report.values()) >= 30
