"""Rollout engines: what samples a policy's completions during policy gradient.

    generate(prompt_ids, group_size, max_new_tokens, temperature, seeds) -> Generation
        tokens, response masks, finished flags, and the engine's own log-probs of the sampled tokens at
        temperature τ; seeds[i] = (seed, step, prompt index) of prompt i, from which the engine draws that
        group's samples, so that a group's samples depend on nothing else in the batch.
    logprobs(tokens, n_pad, prompt_len, temperature) -> (B, N) the engine's log-probs of given tokens
        (a probe: the stale-weights check scores a fixed sequence through it after each sync).
    sync_weights(named_tensors)   the policy's updated weights, by name, after every optimizer step.
    sleep() / wake()              free and retake the engine's memory where it has any to free.
    close()
    exact                         True when its log-probs are the trainer's (no scoring pass, no correction).

`TorchEngine` is pglm's own sampler on the training model itself (`pglm.sampling`): it needs no sync,
its log-probs are the trainer's (the importance ratio is exactly 1), and it is the default everywhere.
An engine with `exact = False` (an inference engine with its own kernels) makes `pglm.train.rl` score
the rollout with the trainer and correct the difference (`pglm.pg.correction`).
"""

from __future__ import annotations

import numpy as np
import torch

from pglm.models.policy import Policy
from pglm.rng import numpy_rng
from pglm.sampling import Generation, generate


def seed_uniforms(seeds: list[tuple[int, int, int]], group_size: int, max_new_tokens: int) -> torch.Tensor:
    """(len(seeds) · G, N) float64: the uniform each sample's token t is drawn with (inverse CDF), group i
    from its own generator, seeded by seeds[i] = (seed, step, prompt index)."""
    # numpy's generators, not torch's: a torch CPU generator keeps only 32 bits of its seed.
    return torch.from_numpy(np.concatenate([numpy_rng(s, step, "sample", i).random((group_size, max_new_tokens))
                                            for s, step, i in seeds]))


class TorchEngine:
    """pglm's KV-cache sampler on the model being trained (a bare language model or its Policy)."""

    exact = True

    def __init__(self, model, eos_id: int, pad_id: int, all_finished=None):
        self.model, self.eos_id, self.pad_id, self.all_finished = model, eos_id, pad_id, all_finished

    def generate(self, prompt_ids: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
                 seeds: list[tuple[int, int, int]], grad: bool = False, with_entropy: bool = False) -> Generation:
        """`grad` keeps the graph of the log-probs (fused scoring, `pglm.train.rl.fuses_scoring`): only
        an engine that is the trainer can."""
        u = seed_uniforms(seeds, group_size, max_new_tokens)
        sample = self.model.generate if isinstance(self.model, Policy) else lambda *a, **k: generate(self.model, *a, **k)
        return sample(prompt_ids, max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id, temperature=temperature,
                      group_size=group_size, uniforms=u, grad=grad, with_entropy=with_entropy,
                      all_finished=self.all_finished)

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor, n_pad: torch.Tensor, prompt_len: int, temperature: float) -> torch.Tensor:
        policy = self.model if isinstance(self.model, Policy) else Policy(self.model)
        return policy(tokens, tokens[:, prompt_len:], n_pad, start=prompt_len - 1, temperature=temperature)[0]

    def sync_weights(self, named_tensors) -> None:
        pass  # it samples from the trained weights themselves

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass
