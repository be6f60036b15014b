"""The recipes of docs/recipes.md, end to end, on tiny data and models made here (no network)."""

import json
import math
import random

import pytest
from hf_models import make_hf_model

from pglm.cli import main


def rows(run, phase):
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


def jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def test_translation_with_chrf_and_bleu_from_an_hf_model(tmp_path):
    pytest.importorskip("sacrebleu")
    model = make_hf_model("qwen2", tmp_path / "qwen2")
    words = [("hallo", "hello"), ("welt", "world"), ("sagt", "says"), ("das modell", "the model")]
    prompts = jsonl(tmp_path / "mt.jsonl", [{"prompt": f"Translate to English: {de}\nEnglish:", "answer": en}
                                            for de, en in words * 4])
    out = tmp_path / "mt"
    assert main(["rl", "--init", f"hf:{model}", "--prompts", str(prompts), "--reward", "builtin:chrf",
                 "--reward", "builtin:bleu", "--reward-weight", "1", "--reward-weight", "0.5", "--max-new-tokens", "6",
                 "--algo", "grpo", "--beta", "0.04", "--steps", "3", "--prompts-per-step", "2", "--group-size", "4",
                 "--out", str(out), "--quiet"]) == 0
    rl = rows(out, "rl")
    assert len(rl) == 3 and all(0.0 <= r["reward_mean"] <= 1.5 and math.isfinite(r["kl"]) for r in rl)
    assert main(["generate", "--ckpt", str(out), "--prompt", "Translate to English: hallo\nEnglish:",
                 "--max-new-tokens", "4"]) == 0


POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]


def test_sentiment_steered_generation_with_a_trained_classifier(tmp_path):
    rng = random.Random(0)
    text = tmp_path / "reviews.txt"
    text.write_text("\n".join(f"the film was {rng.choice(POSITIVE + NEGATIVE)} and {rng.choice(POSITIVE + NEGATIVE)}"
                              for _ in range(400)))
    lm = tmp_path / "lm"
    assert main(["pretrain", "--data", str(text), "--steps", "150", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
                 "--block-size", "32", "--batch-size", "16", "--lr", "3e-3", "--out", str(lm), "--quiet"]) == 0

    def pair():
        return {"prompt": "the film was", "chosen": f" {rng.choice(POSITIVE)} and {rng.choice(POSITIVE)}",
                "rejected": f" {rng.choice(NEGATIVE)} and {rng.choice(POSITIVE + NEGATIVE)}"}

    prefs = jsonl(tmp_path / "prefs.jsonl", [pair() for _ in range(300)])
    rm = tmp_path / "sentiment-rm"
    assert main(["reward", "--init", str(lm), "--data", str(prefs), "--steps", "80", "--lr", "3e-3",
                 "--batch-size", "16", "--eval-every", "40", "--out", str(rm), "--quiet"]) == 0
    assert json.loads((rm / "summary.json").read_text())["val_accuracy"] >= 0.9

    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the film was"}] * 8)
    out = tmp_path / "positive"
    assert main(["rl", "--init", str(lm), "--prompts", str(prompts), "--reward", f"rm:{rm}", "--reward-norm",
                 "--max-new-tokens", "12", "--algo", "rloo", "--beta", "0.05", "--steps", "30", "--lr", "3e-3",
                 "--prompts-per-step", "4", "--group-size", "8", "--out", str(out), "--quiet"]) == 0
    rl = rows(out, "rl")
    assert all("reward_norm_std" in r for r in rl)
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rl[:5], rl[-5:]))
    assert last > first, (first, last)  # the classifier's score of the continuations rose


def test_chat_prompts_and_a_reward_model_from_chat_preference_pairs(tmp_path):
    model = make_hf_model("qwen2", tmp_path / "qwen2")  # ChatML chat template

    def conversation(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    questions = ["hi", "2+2?", "hello world", "say hi"]
    prefs = jsonl(tmp_path / "chat-prefs.jsonl",  # implicit prompt: the shared user turn
                  [{"chosen": conversation(q, "hello"), "rejected": conversation(q, "a b c d e f g")} for q in questions * 6])
    rm = tmp_path / "chat-rm"
    assert main(["reward", "--init", f"hf:{model}", "--lora-r", "4", "--data", str(prefs), "--steps", "20",
                 "--lr", "1e-2", "--batch-size", "4", "--eval-every", "10", "--out", str(rm), "--quiet"]) == 0
    assert json.loads((rm / "summary.json").read_text())["val_accuracy"] >= 0.9

    prompts = jsonl(tmp_path / "chat-prompts.jsonl", [{"prompt": conversation(q, "x")[:1]} for q in questions])
    out = tmp_path / "chat-rlhf"
    assert main(["rl", "--init", f"hf:{model}", "--lora-r", "4", "--prompts", str(prompts), "--reward", f"rm:{rm}",
                 "--reward-norm", "--reward-clip", "5", "--max-new-tokens", "6", "--algo", "grpo", "--beta", "0.04",
                 "--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--out", str(out), "--quiet"]) == 0
    assert len(rows(out, "rl")) == 2
    exported = tmp_path / "chat-rm-hf"
    assert main(["export", "--ckpt", str(rm), "--out", str(exported)]) == 0
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]
