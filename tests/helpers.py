"""Shared by the test modules."""

import copy
import dataclasses

import torch

from pglm.cli import main
from pglm.engines import TorchEngine

# A one-layer GPT small enough for a test to train in a second or two.
TINY = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "8", "--quiet"]


def tiny_sft_runs(tmp):
    """TMP/gpt and TMP/lstm: two-step add2 SFT runs of TINY models, to start policy gradient from."""
    for arch in ("gpt", "lstm"):
        assert main(["sft", "--task", "add2", "--model", arch, "--steps", "2", "--out", str(tmp / arch), *TINY]) == 0
    return tmp


@torch.no_grad()
def move_adapters(model, std: float = 0.3) -> None:
    """Draw every LoRA B from N(0, std²): peft starts B at 0, and an adapter that moves the policy is
    what a test of LoRA needs."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, std)


def error_line(capsys, argv):
    """Run argv; check it fails with exit 2 and exactly one stderr line, no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


class CopyEngine:
    """An engine with weights of its own, a copy of the policy's: `skew(g)` is subtracted from its
    log-probs (its kernels differ), and `sync=False` ignores every sync (stale weights)."""

    exact = False

    def __init__(self, model, tok, skew=None, sync=True):
        self.model, self.skew, self.sync = copy.deepcopy(model), skew, sync
        self.inner = TorchEngine(self.model, tok.eos_id, tok.pad_id)

    def generate(self, prompts, group_size, max_new_tokens, temperature, seeds):
        g = self.inner.generate(prompts, group_size, max_new_tokens, temperature, seeds)
        if self.skew is not None:
            g = dataclasses.replace(g, logprobs=(g.logprobs - self.skew(g)) * g.response_mask)
        return g

    def logprobs(self, tokens, n_pad, prompt_len, temperature):
        return self.inner.logprobs(tokens, n_pad, prompt_len, temperature)

    @torch.no_grad()
    def sync_weights(self, named_tensors):
        if self.sync:
            for name, p in named_tensors:
                self.model.get_parameter(name).copy_(p)

    def sleep(self):
        pass  # its memory is the test's

    def wake(self):
        pass
