"""Hugging Face models in pglm: tiny random GPT-2, Llama and Qwen2 made here (tests/hf_models.py).

Positions of left-padded rows, sft and rl (grpo, ppo) through the CLI with and without LoRA, the
LoRA reference, prompt datasets (JSONL chat rows, Parquet, save_to_disk), and bad input.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import error_line, move_adapters  # noqa: E402
from hf_models import make_hf_model  # noqa: E402

from pglm.cli import main  # noqa: E402
from pglm.pg.logprobs import shifted_logprobs  # noqa: E402
from pglm.runs import load_run  # noqa: E402
from pglm.sampling import generate  # noqa: E402

KINDS = ["gpt2", "llama", "qwen2"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_model(kind, root / kind) for kind in KINDS}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # absolute positions, and rotary ones
def test_scored_logprobs_equal_the_samplers_for_left_padded_prompts(hf_dirs, kind):
    run = load_run(f"hf:{hf_dirs[kind]}")
    tok, model = run.tokenizer, run.model
    prompts = [tok.prompt_ids(p) for p in ["1+2=", "hello world, the model", "a"]]  # 3 different lengths
    g = generate(model, prompts, 8, eos_id=tok.eos_id, pad_id=tok.pad_id, group_size=2,
                 generator=torch.Generator().manual_seed(0))
    assert int(g.n_pad.max()) > 0
    scored = shifted_logprobs(model, g.tokens, g.n_pad)[:, g.prompt_len - 1 :]  # (B, N)
    assert torch.allclose(scored * g.response_mask, g.logprobs, atol=1e-5)
    # and a padded row scores as the same row alone, unpadded
    row = 4  # a sample of the shortest prompt, the most padded row
    alone = torch.tensor([prompts[2] + g.response_ids(row)])
    lp_alone = shifted_logprobs(model, alone)[0, len(prompts[2]) - 1 :]
    assert torch.allclose(lp_alone, g.logprobs[row][g.response_mask[row]], atol=1e-5)


def test_tokenizers_follow_their_families_bos_rule(hf_dirs):
    llama, gpt2 = load_run(f"hf:{hf_dirs['llama']}").tokenizer, load_run(f"hf:{hf_dirs['gpt2']}").tokenizer
    assert llama.add_bos and llama.prompt_ids("12")[0] == llama.bos_id
    assert not gpt2.add_bos and gpt2.prompt_ids("12") == gpt2.encode("12")
    assert gpt2.prompt_ids("") == [gpt2.bos_id]  # never an empty prompt
    qwen = load_run(f"hf:{hf_dirs['qwen2']}").tokenizer
    text = qwen.render_chat([{"role": "user", "content": "7+8?"}])
    assert text == "<|im_start|>user\n7+8?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen.prompt_ids(text)[0] == qwen.encode("<|im_start|>")[0]  # a special token, not its characters


def _data(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(12)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(12)))
    return sft, prompts


RL = ["--reward", "builtin:exact_match", "--max-new-tokens", "3", "--steps", "2", "--prompts-per-step", "2",
      "--group-size", "2", "--quiet"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", KINDS)
def test_sft_then_grpo_and_ppo_through_the_cli(hf_dirs, kind, lora, tmp_path):
    sft_data, prompts = _data(tmp_path)
    lora_flags = ["--lora-r", "4"] if lora else []
    base = load_run(f"hf:{hf_dirs[kind]}").model
    assert main(["sft", "--model", f"hf:{hf_dirs[kind]}", "--data", str(sft_data), "--steps", "2", "--batch-size", "4",
                 "--lr", "1e-2", "--eval-every", "2", "--out", str(tmp_path / "sft"), "--quiet", *lora_flags]) == 0
    sft = load_run(tmp_path / "sft").model
    cfg = json.loads((tmp_path / "sft" / "config.json").read_text())["model"]
    assert cfg["arch"] == "hf" and cfg["lora_r"] == (4 if lora else 0)
    moved = {n for n, p in sft.inner.named_parameters() if "lora_" not in n
             and not torch.equal(p, dict(base.inner.named_parameters())[n.replace("base_layer.", "")])}
    if lora:
        assert not moved  # only the adapter trained
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in sft.named_parameters())
    else:
        assert moved
    # grpo from the sft run (its adapter goes on training), with a KL to the reference; ppo from hf:PATH
    assert main(["rl", "--init", str(tmp_path / "sft"), "--prompts", str(prompts), "--algo", "grpo", "--beta", "0.1",
                 "--out", str(tmp_path / "grpo"), *RL]) == 0
    assert main(["rl", "--init", f"hf:{hf_dirs[kind]}", "--prompts", str(prompts), "--algo", "ppo",
                 "--out", str(tmp_path / "ppo"), *RL, *lora_flags]) == 0
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["phase"] == "rl"]
    assert len(rl_rows) == 2
    if lora:  # the reference is the base model under the adapter, which sft has moved away from
        assert abs(rl_rows[0]["kl"]) > 1e-4  # (k1 is unbiased, not positive, per sample)
    else:  # the reference is a copy of the --init model, whose samples the first rollout is
        assert abs(rl_rows[0]["kl"]) < 1e-5
    assert rl_rows[1]["kl"] == rl_rows[1]["kl"] and rl_rows[1]["loss"] == rl_rows[1]["loss"]  # not NaN
    assert (tmp_path / "ppo" / "checkpoints" / "step_2" / "value_head.safetensors").is_file()


def test_lora_reference_is_the_base_model_with_the_adapter_off(hf_dirs):
    from pglm.models.hf import add_lora
    from pglm.models.policy import AdapterOff, Policy
    from pglm.pg.logprobs import token_logprobs

    model = load_run(f"hf:{hf_dirs['llama']}").model
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    before = token_logprobs(model(tokens)[:, :-1], tokens[:, 1:]).detach()  # (2, 8) of the base model
    add_lora(model, 4, 16.0, ["q_proj", "v_proj", "lm_head"])
    move_adapters(model, std=1.0)  # an adapter that changes the policy, lm_head included
    policy = Policy(model)
    logp, _, _ = policy(tokens, tokens[:, 1:])
    ref_logp, values, _ = AdapterOff(policy)(tokens, tokens[:, 1:])
    assert not torch.allclose(logp, before, atol=1e-3)  # the adapter moved the policy
    assert torch.allclose(ref_logp, before, atol=1e-6) and values is None  # its reference did not
    assert torch.allclose(policy(tokens, tokens[:, 1:])[0], logp)  # and the adapter is back on after


def test_chat_prompt_datasets_jsonl_parquet_and_save_to_disk(hf_dirs, tmp_path):
    datasets = pytest.importorskip("datasets")
    from pglm.data import read_prompt_rows, render_prompts

    qwen = load_run(f"hf:{hf_dirs['qwen2']}").tokenizer
    rows = [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"},
            {"prompt": "3+3=", "answer": "6"}]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = ["<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "3+3="]
    assert [r["prompt"] for r in render_prompts(read_prompt_rows(str(jsonl)), qwen)] == want
    flat = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(5)]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "saved"))
    assert read_prompt_rows(str(tmp_path / "p.parquet")) == flat
    assert read_prompt_rows(str(tmp_path / "saved")) == flat


def test_an_hf_run_and_hf_path_work_with_eval_and_generate(hf_dirs, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, the model says hi. " * 40)
    assert main(["pretrain", "--model", f"hf:{hf_dirs['gpt2']}", "--data", str(text), "--steps", "2", "--batch-size",
                 "2", "--block-size", "32", "--eval-every", "2", "--out", str(tmp_path / "pt"), "--quiet"]) == 0
    for ckpt in (str(tmp_path / "pt"), f"hf:{hf_dirs['llama']}"):
        assert main(["eval", "--ckpt", ckpt, "--data", str(text), "--json"]) == 0
        assert main(["generate", "--ckpt", ckpt, "--prompt", "hello", "--max-new-tokens", "5", "--num-samples", "2"]) == 0
    capsys.readouterr()
    # the resumed run rebuilds the model from config.json and the checkpoint alone
    assert main(["pretrain", "--out", str(tmp_path / "pt"), "--resume", "--steps", "3", "--quiet"]) == 0


def test_bad_input_one_line_each(hf_dirs, tmp_path, capsys):
    _, prompts = _data(tmp_path)
    (tmp_path / "empty").mkdir()
    err = error_line(capsys, ["rl", "--init", f"hf:{tmp_path / 'empty'}", "--task", "add2", "--out", str(tmp_path / "a")])
    assert "not a model directory" in err
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "my-own-lm", "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    err = error_line(capsys, ["rl", "--init", f"hf:{remote}", "--task", "add2", "--out", str(tmp_path / "b")])
    assert "--trust-remote-code" in err
    err = error_line(capsys, ["rl", "--init", f"hf:{hf_dirs['llama']}", "--prompts", str(prompts), "--lora-r", "4",
                              "--lora-targets", "q_proj,not_a_module", "--out", str(tmp_path / "c"), *RL])
    assert "not_a_module" in err and "q_proj" in err
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "x"}) + "\n")
    err = error_line(capsys, ["rl", "--init", f"hf:{hf_dirs['gpt2']}", "--prompts", str(chat), "--out",
                              str(tmp_path / "d"), *RL])
    assert "chat template" in err
    assert not any((tmp_path / x).exists() for x in "abcd")  # nothing half-made is left behind


def test_export_of_hf_runs_full_lora_and_merged(hf_dirs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft_data, _ = _data(tmp_path)
    common = ["--data", str(sft_data), "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--quiet"]
    assert main(["sft", "--model", f"hf:{hf_dirs['qwen2']}", *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["sft", "--model", f"hf:{hf_dirs['llama']}", *common, "--lora-r", "4", "--out", str(tmp_path / "lora")]) == 0
    tokens = torch.randint(0, 300, (2, 11))
    for run, flags in [("full", []), ("lora", ["--merge-lora"])]:  # qwen2 in full, llama with LoRA
        out = tmp_path / f"{run}-hf"
        assert main(["export", "--ckpt", str(tmp_path / run), "--format", "hf", "--out", str(out), *flags]) == 0
        ours = load_run(tmp_path / run)
        theirs = AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(theirs(tokens).logits, ours.model(tokens), atol=1e-4)
        text = "1+2="
        assert AutoTokenizer.from_pretrained(out)(text).input_ids == ours.tokenizer.prompt_ids(text)
    # without --merge-lora: the adapter alone, in peft's format, over the base it names
    assert main(["export", "--ckpt", str(tmp_path / "lora"), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(hf_dirs["llama"])
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(adapted(tokens).logits, load_run(tmp_path / "lora").model(tokens), atol=1e-4)
    capsys.readouterr()
    err = error_line(capsys, ["export", "--ckpt", str(tmp_path / "full"), "--out", str(tmp_path / "x"), "--merge-lora"])
    assert "no LoRA adapter" in err


def test_chat_renders_the_conversation_through_the_chat_template(hf_dirs, monkeypatch, capsys):
    import pglm.cli.apply as apply

    lines, prompts_seen = iter(["1+1?", "and 2+2?"]), []

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    real_sample = apply._sample
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(apply, "_sample", lambda run, prompts, args, g: prompts_seen.append(prompts[0]) or
                        real_sample(run, prompts, args, g))
    assert main(["chat", "--ckpt", f"hf:{hf_dirs['qwen2']}", "--max-new-tokens", "3", "--greedy"]) == 0
    assert "chat template" in capsys.readouterr().out.splitlines()[0]
    assert prompts_seen[0] == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    # the second turn carries the first, with the model's reply as the assistant's message
    assert prompts_seen[1].startswith(prompts_seen[0]) and prompts_seen[1].endswith(
        "<|im_start|>user\nand 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_pglms_own_gpt2_forward_equals_transformers(hf_dirs, monkeypatch):
    from pglm.models.hf import HFCausalLM

    model = load_run(f"hf:{hf_dirs['gpt2']}").model
    assert model._fast  # GPT-2 in eval mode takes pglm's forward (hf_fast.py)
    tok = load_run(f"hf:{hf_dirs['gpt2']}").tokenizer
    prompts = [tok.prompt_ids(p) for p in ["1+2=", "hello world, the model", "a"]]

    def both(fn):
        fast = fn()
        with monkeypatch.context() as m:
            m.setattr(HFCausalLM, "_fast", property(lambda self: False))
            slow = fn()
        return fast, slow

    tokens = torch.randint(0, 300, (3, 12))
    n_pad = torch.tensor([0, 5, 11])
    fast, slow = both(lambda: model(tokens, n_pad))
    real = torch.arange(12)[None, :] >= n_pad[:, None]  # pad positions' outputs are never used
    assert torch.allclose(fast[real], slow[real], atol=1e-5)
    fast, slow = both(lambda: generate(model, prompts, 8, eos_id=tok.eos_id, pad_id=tok.pad_id, group_size=3,
                                       generator=torch.Generator().manual_seed(1)))
    assert torch.equal(fast.tokens, slow.tokens) and torch.allclose(fast.logprobs, slow.logprobs, atol=1e-5)


def test_sft_on_a_task_starts_from_an_hf_model(hf_dirs, tmp_path):
    """--task with --model hf:PATH trains the HF model on the task (its tokenizer encodes add2's text)."""
    out = tmp_path / "sft"
    assert main(["sft", "--task", "add2", "--model", f"hf:{hf_dirs['llama']}", "--steps", "1", "--batch-size", "4",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["arch"] == "hf"
