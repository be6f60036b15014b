"""Reward models: the Bradley–Terry loss by hand, the score's last-token read, `pglm reward` end to end,
`pglm rl --reward rm:`, and bad input."""

import json
import math
import random

import pytest
import torch
from helpers import error_line

from pglm.cli import main
from pglm.errors import UserError
from pglm.models import GPT, LSTMLM, ModelConfig
from pglm.models.reward import RewardModel, padded
from pglm.train.reward import bradley_terry_loss

SMALL = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--block-size", "16", "--quiet"]


def test_bradley_terry_loss_and_its_gradient_by_hand():
    rc = torch.tensor([1.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    # −log σ(1) = log(1 + e^−1) = 0.313262, −log σ(0) = log 2 = 0.693147; mean 0.503204
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    loss.backward()
    # ∂/∂r_c of −log σ(d) is σ(d) − 1: (0.731059 − 1) / 2 and (0.5 − 1) / 2; ∂/∂r_r is the opposite
    assert rc.grad.tolist() == pytest.approx([-0.134470, -0.25], abs=1e-6)
    assert rr.grad.tolist() == pytest.approx([0.134470, 0.25], abs=1e-6)

    # a margin of 0.5 on the first pair (Llama 2): −log σ(0.5) = 0.474077; centring η = 0.1 adds η (r_c + r_r)²
    rc.grad = rr.grad = None
    loss = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.0]), center_coef=0.1)
    assert loss.item() == pytest.approx((0.474077 + 0.693147 + 0.1 * 1.0) / 2, abs=1e-6)
    loss.backward()
    sig = 1 / (1 + math.exp(-0.5))
    assert rc.grad.tolist() == pytest.approx([(sig - 1 + 0.2) / 2, -0.25], abs=1e-6)  # + 2η(r_c + r_r)/2
    assert rr.grad.tolist() == pytest.approx([(1 - sig + 0.2) / 2, 0.25], abs=1e-6)
    # the pair count of a whole step divides instead, when given
    assert bradley_terry_loss(rc, rr, n_pairs=4).item() == pytest.approx(0.503204 / 2, abs=1e-6)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_the_score_reads_the_last_real_token_under_left_and_right_padding(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=12, n_layer=1, d_model=16, n_head=2, block_size=12)
    rm = RewardModel(GPT(cfg) if arch == "gpt" else LSTMLM(cfg)).eval()
    short, long = [1, 5, 6, 7, 2], [1, 4, 4, 8, 9, 3, 2]
    alone = [rm(*padded([s], 0)).item() for s in (short, long)]
    right = rm(*padded([short, long], 0)).tolist()  # the short row padded on the right
    tokens = torch.tensor([[0, 0] + short, long])  # the short row padded on the left
    mask = torch.tensor([[False, False] + [True] * 5, [True] * 7])
    left = rm(tokens, mask).tolist()
    assert right == pytest.approx(alone, abs=1e-5) and left == pytest.approx(alone, abs=1e-5)
    # what it reads is the last real token: changing it changes the score, changing a pad does not
    assert rm(*padded([short[:-1] + [3]], 0)).item() != pytest.approx(alone[0], abs=1e-4)
    repadded = rm(torch.tensor([short + [9, 9]]), torch.tensor([[True] * 5 + [False] * 2])).item()
    assert repadded == pytest.approx(alone[0], abs=1e-5)


def test_reading_the_last_slot_instead_of_the_last_real_token_fails_the_padding_test():
    """The mutation that the padding test catches: a score read at position T − 1, pads or not."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=12, n_layer=1, d_model=16, n_head=2, block_size=12)
    rm = RewardModel(GPT(cfg)).eval()
    tokens, mask = padded([[1, 5, 6, 7, 2], [1, 4, 4, 8, 9, 3, 2]], 0)
    at_last_slot = rm.score(rm.model.features(tokens)[:, -1]).squeeze(-1)
    assert at_last_slot[0].item() != pytest.approx(rm(*padded([[1, 5, 6, 7, 2]], 0)).item(), abs=1e-4)


def sevens(text: str) -> int:
    return text.count("7")


def write_prefs(path, n: int, seed: int):
    """A synthetic preference: of two answers to an add2 prompt, the rater prefers the one with more 7s."""
    rng = random.Random(seed)

    def answer():
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))

    with open(path, "w") as f:
        for _ in range(n):
            c, r = answer(), answer()
            while sevens(c) == sevens(r):
                c, r = answer(), answer()
            if sevens(c) < sevens(r):
                c, r = r, c
            f.write(json.dumps({"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=", "chosen": c, "rejected": r}) + "\n")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """An add2 SFT model, a reward model trained from it on the 7s preference, and the data."""
    tmp = tmp_path_factory.mktemp("reward")
    assert main(["sft", "--task", "add2", "--steps", "30", "--batch-size", "16", "--out", str(tmp / "sft"), *SMALL]) == 0
    write_prefs(tmp / "prefs.jsonl", 400, seed=0)
    write_prefs(tmp / "heldout.jsonl", 200, seed=1)
    assert main(["reward", "--init", str(tmp / "sft"), "--data", str(tmp / "prefs.jsonl"), "--val-data",
                 str(tmp / "heldout.jsonl"), "--steps", "120", "--lr", "3e-3", "--batch-size", "16",
                 "--eval-every", "60", "--out", str(tmp / "rm"), "--quiet"]) == 0
    return tmp


def test_a_reward_model_learns_the_preference_and_policy_gradient_raises_it(chain, tmp_path):
    summary = json.loads((chain / "rm" / "summary.json").read_text())
    assert summary["command"] == "reward" and summary["val_pairs"] == 200
    assert summary["val_accuracy"] >= 0.95, summary
    assert (chain / "rm" / "plots" / "loss.png").is_file()

    prompts = tmp_path / "prompts.jsonl"
    rng = random.Random(2)
    prompts.write_text("".join(json.dumps({"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}="}) + "\n"
                               for _ in range(64)))
    out = tmp_path / "rl"
    assert main(["rl", "--init", str(chain / "sft"), "--prompts", str(prompts), "--reward", f"rm:{chain / 'rm'}",
                 "--max-new-tokens", "3", "--steps", "30", "--lr", "3e-3", "--prompts-per-step", "8",
                 "--group-size", "8", "--out", str(out), "--quiet"]) == 0

    from pglm.rewards.learned import reward_model
    from pglm.runs import load_run
    from pglm.sampling import complete

    score = reward_model(str(chain / "rm"))
    rows = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]

    def figures(run):
        torch.manual_seed(0)
        loaded = load_run(run)
        _, texts = complete(loaded.model, loaded.tokenizer, rows * 4, 3)
        return sum(score(rows * 4, texts)) / len(texts), sum(map(sevens, texts)) / len(texts)

    (score0, true0), (score1, true1) = figures(chain / "sft"), figures(out)
    assert score1 > score0 + 1.0, (score0, score1)  # the reward model's score rose
    assert true1 > true0 + 0.3, (true0, true1)  # and so did the preference it was trained from


def test_eval_gives_a_reward_model_s_pairwise_accuracy(chain, capsys):
    assert main(["eval", "--ckpt", str(chain / "rm"), "--data", str(chain / "heldout.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((chain / "rm" / "summary.json").read_text())
    assert result["val_pairs"] == 200
    assert result["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    assert result["val_margin"] == pytest.approx(summary["val_margin"], rel=1e-5)


def test_a_reward_run_resumes_with_its_head(chain, tmp_path):
    import shutil

    from safetensors.torch import load_file

    straight, out = tmp_path / "straight", tmp_path / "rm"
    assert main(["reward", "--init", str(chain / "sft"), "--data", str(chain / "prefs.jsonl"), "--lr", "3e-3",
                 "--batch-size", "8", "--eval-every", "4", "--ckpt-every", "4", "--steps", "8", "--quiet",
                 "--out", str(straight)]) == 0
    shutil.copytree(straight, out)  # the same run, as if stopped after its checkpoint at step 4
    shutil.rmtree(out / "checkpoints" / "step_8")
    (out / "checkpoints" / "latest").write_text("step_4")
    (out / "summary.json").unlink()
    assert main(["reward", "--out", str(out), "--resume", "--quiet"]) == 0

    for part in ("model", "score"):
        a = load_file(out / "checkpoints" / "step_8" / f"{part}.safetensors")
        b = load_file(straight / "checkpoints" / "step_8" / f"{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_a_sharded_reward_run_resumes_and_loads_as_the_full_one(chain, tmp_path):
    """--ckpt-format sharded keeps the head beside the body: resumed and loaded (pglm eval, rm:), it is
    the run that wrote full checkpoints, weight for weight."""
    import shutil

    from pglm.runs import load_reward_model

    flags = ["reward", "--init", str(chain / "sft"), "--data", str(chain / "prefs.jsonl"), "--lr", "3e-3",
             "--batch-size", "8", "--eval-every", "4", "--ckpt-every", "4", "--steps", "8", "--quiet"]
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    assert main([*flags, "--out", str(full)]) == 0
    assert main([*flags, "--ckpt-format", "sharded", "--out", str(sharded)]) == 0
    assert (sharded / "checkpoints" / "step_8" / "sharded").is_dir()
    assert not (sharded / "checkpoints" / "step_8" / "score.safetensors").exists()
    shutil.rmtree(sharded / "checkpoints" / "step_8")  # as if stopped after its checkpoint at step 4
    (sharded / "checkpoints" / "latest").write_text("step_4")
    (sharded / "summary.json").unlink()
    assert main(["reward", "--out", str(sharded), "--resume", "--quiet"]) == 0
    a, b = (load_reward_model(run).model.state_dict() for run in (full, sharded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_preference_data_and_reward_models_get_one_line(chain, tmp_path, capsys):
    base = ["reward", "--init", str(chain / "sft"), "--steps", "2", "--quiet"]

    def fails(rows, *more):
        f = tmp_path / "p.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "out"
        line = error_line(capsys, [*base, "--data", str(f), "--out", str(out), *more])
        assert not out.exists()  # a failed new run leaves nothing behind
        return line

    assert "no 'rejected' field" in fails([{"prompt": "1+1=", "chosen": "2"}])
    assert "no 'chosen' field" in fails([{"prompt": "1+1=", "rejected": "2"}])
    assert "are the same text" in fails([{"prompt": "1+1=", "chosen": "2", "rejected": "2"}] * 3)
    assert "holds no pairs" in fails([])
    assert "'margin' must be a finite number" in fails([{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": "x"}])
    assert "must be text or a list of chat messages" in fails([{"prompt": "1+1=", "chosen": 2, "rejected": "3"}])
    assert "needs --init" in error_line(capsys, ["reward", "--data", "x.jsonl", "--out", str(tmp_path / "o")])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "12+34="}) + "\n")
    rl = ["rl", "--init", str(chain / "sft"), "--prompts", str(prompts), "--steps", "1", "--out", str(tmp_path / "rl"),
          "--quiet"]
    assert "no config.json" in error_line(capsys, [*rl, "--reward", f"rm:{tmp_path}"])
    assert "not a reward model" in error_line(capsys, [*rl, "--reward", f"rm:{chain / 'sft'}"])
    three = tmp_path / "three"  # an HF classifier with three outputs
    three.mkdir()
    (three / "config.json").write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"], "num_labels": 3}))
    assert "neither a pglm reward run nor a one-output classifier" in error_line(capsys, [*rl, "--reward", f"rm:{three}"])
    # the reward model reads 16 tokens: bos, the 6 characters of the prompt and eos, with 9 new tokens, do not fit
    line = error_line(capsys, [*rl, "--reward", f"rm:{chain / 'rm'}", "--max-new-tokens", "9"])
    assert "reads at most 16 tokens" in line, line


def _round_trip(run_dir, out, texts):
    """pglm's scores of (prompt, completion) pairs and transformers' scores of the export, same ids."""
    from transformers import AutoModelForSequenceClassification

    from pglm.export import export_run
    from pglm.models.reward import pair_ids
    from pglm.runs import load_reward_model

    export_run(run_dir, out)
    loaded = load_reward_model(run_dir)
    seqs = [pair_ids(loaded.tokenizer, p, c) for p, c in texts]
    tokens, mask = padded(seqs, loaded.tokenizer.pad_id)
    with torch.no_grad():
        ours = loaded.model(tokens, mask)
        hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
        theirs = hf(input_ids=tokens, attention_mask=mask.long()).logits[:, 0]
    return hf, ours, theirs


def test_a_gpt_reward_run_exports_as_a_classifier_with_the_same_scores(chain, tmp_path):
    texts = [("12+34=", "46"), ("7+8=", "777"), ("1+1=", "2")]
    hf, ours, theirs = _round_trip(chain / "rm", tmp_path / "hf", texts)
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    assert theirs.tolist() == pytest.approx(ours.tolist(), abs=1e-4)
    assert ours.std() > 0.1  # scores that differ, so agreeing means something


def test_an_hf_reward_run_exports_as_its_own_classifier_with_the_same_scores(tmp_path):
    from hf_models import make_hf_model

    base = make_hf_model("llama", tmp_path / "llama")  # no pad token: pad is eos, so eos is not appended
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": "hello ", "chosen": "world" * (i % 3 + 1), "rejected": "a b"}) + "\n"
                             for i in range(12)))
    out = tmp_path / "rm"
    assert main(["reward", "--init", f"hf:{base}", "--data", str(prefs), "--steps", "3", "--lr", "1e-2",
                 "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    hf, ours, theirs = _round_trip(out, tmp_path / "hf", [("hello ", "world"), ("a b", " c d e f g"), ("7+8=", "15")])
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert theirs.tolist() == pytest.approx(ours.tolist(), abs=1e-4)
    assert ours.std() > 1e-3


def test_special_tokens_spelled_out_in_a_completion_read_as_those_tokens(chain, tmp_path):
    """A policy's completion text writes a generated <pad> or <bos> out (pglm.sampling.completion_text);
    a preference file holding such texts reads them back as those tokens, as the reward model scores them."""
    from pglm.models.reward import encode_text, pair_ids
    from pglm.runs import load_run
    from pglm.train.reward import read_preferences

    tok = load_run(chain / "sft").tokenizer
    pad, bos = (tok.decode([i], skip_special=False) for i in (tok.pad_id, tok.bos_id))
    assert encode_text(tok, f"4{pad}{bos}2") == tok.encode("4") + [tok.pad_id, tok.bos_id] + tok.encode("2")
    assert pair_ids(tok, "2+2=", f"4{pad}") == tok.prompt_ids("2+2=") + tok.encode("4") + [tok.pad_id, tok.eos_id]
    with pytest.raises(UserError):  # what reading the text without the specials did
        tok.encode(f"4{pad}")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "2+2=", "chosen": "4", "rejected": f"4{pad}"}) + "\n")
    [pair] = read_preferences(str(tmp_path / "p.jsonl"), tok, 16)
    assert pair.rejected == pair_ids(tok, "2+2=", f"4{pad}")
