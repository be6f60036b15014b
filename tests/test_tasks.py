"""Built-in tasks: the add2 contract of docs/design.md, disjoint held-out sets, rewards, pass@k by hand."""

import random

import pytest

from pglm.errors import UserError
from pglm.tasks import TASKS, evaluate_completions, get_task, pass_at_k
from pglm.tasks.add2 import HELDOUT_PAIRS, TRAIN_PAIRS, has_carry, parse_prompt


def test_add2_heldout_is_exactly_the_design_split():
    expected = random.Random(1234).sample([(a, b) for a in range(100) for b in range(100)], 500)
    rows = get_task("add2").heldout()
    assert [r["prompt"] for r in rows] == [f"{a}+{b}=" for a, b in expected]
    assert [r["answer"] for r in rows] == [str(a + b) for a, b in expected]
    assert HELDOUT_PAIRS == expected
    assert len(TRAIN_PAIRS) == 9500 and not set(TRAIN_PAIRS) & set(expected)


def test_add2_training_never_sees_a_heldout_pair():
    task = get_task("add2")
    held = {r["prompt"] for r in task.heldout()}
    rows = task.train_prompts(random.Random(0), 20_000)
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == 20_000 and not held & set(prompts)
    # Uniform over the 9,500 training pairs: with 20,000 draws nearly all of them appear (expected
    # missing: 9500·(1−1/9500)^20000 ≈ 1160), and both operands span 0..99.
    assert 8000 < len(set(prompts)) < 8800
    pairs = [parse_prompt(p) for p in prompts]
    assert {a for a, _ in pairs} == set(range(100)) == {b for _, b in pairs}
    assert all(r["answer"] == str(a + b) for r, (a, b) in zip(rows, pairs))
    again = task.train_prompts(random.Random(0), 5)
    assert again == rows[:5]  # the rng alone decides


def test_add2_reward_exact_sum_only():
    task = get_task("add2")
    completions = ["12", " 12 ", "12\n", "012", "12x", "13", "", "1 2", "+12"]
    expected = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert task.reward(["5+7="] * len(completions), completions) == expected
    # The answer comes from the prompt, not from a column that could disagree.
    assert task.reward(["99+99=", "0+0="], ["198", "0"], answer=["wrong", "wrong"]) == [1.0, 1.0]
    assert task.solution({"prompt": "99+99="}) == "198"
    with pytest.raises(ValueError, match="not an add2 prompt"):
        task.reward(["5+7"], ["12"])


def test_add2_tokenizer_and_carry():
    task = get_task("add2")
    tok = task.tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 15)
    assert tok.encode("10+2=") == [4, 3, 13, 5, 14]
    assert task.max_new_tokens == len("198") + 1
    assert has_carry(7, 5) and has_carry(19, 91) and not has_carry(12, 34) and not has_carry(90, 90)


@pytest.mark.parametrize("name, prompt, answer", [("reverse", "abc>", "cba"), ("sort_digits", "3141:", "1134")])
def test_string_tasks(name, prompt, answer):
    task = get_task(name)
    assert task.answer(prompt) == answer and task.solution({"prompt": prompt}) == answer
    assert task.reward([prompt] * 3, [answer, f" {answer}\n", answer + answer[-1]]) == [1.0, 1.0, 0.0]
    held = task.heldout()
    assert len(held) == 500 == len({r["prompt"] for r in held})
    assert held == task.heldout() == type(task)().heldout()  # fixed, not drawn per call
    rows = task.train_prompts(random.Random(1), 5000)
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in rows}
    lengths = {len(r["prompt"]) - 1 for r in rows}
    assert lengths == set(range(1, 7))
    tok = task.tokenizer()
    for r in held[:20] + rows[:20]:
        assert r["answer"] == task.answer(r["prompt"])
        tok.encode(r["prompt"] + r["answer"])  # every character is in the alphabet
        assert len(r["answer"]) + 1 <= task.max_new_tokens
    with pytest.raises(ValueError, match=f"not a {name} prompt"):
        task.answer("xyz")


def test_unknown_task():
    with pytest.raises(UserError, match=r"unknown task 'add3'; choose one of add2, reverse, sort_digits"):
        get_task("add3")
    assert set(TASKS) == {"add2", "reverse", "sort_digits"}


def test_pass_at_k_by_hand():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == 0.5
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_evaluate_completions_by_hand():
    task = get_task("add2")
    rows = [task.row("1+2="), task.row("5+5="), task.row("9+9=")]
    completions = [
        ["3", "4", "4", "4"],  # greedy right; c=1 of 4
        ["11", "10", "10", "1"],  # greedy wrong; c=2
        ["17", "16", "19", "0"],  # c=0
    ]
    out = evaluate_completions(task, rows, completions, k_values=(1, 2))
    assert out["accuracy"] == pytest.approx(1 / 3)
    # pass@1 = (1/4 + 2/4 + 0)/3 ; pass@2 = (0.5 + (1 - C(2,2)/C(4,2)) + 0)/3 = (0.5 + 5/6)/3
    assert out["pass@1"] == pytest.approx(0.25)
    assert out["pass@2"] == pytest.approx((0.5 + 5 / 6) / 3)
    assert (out["n_prompts"], out["n_samples"]) == (3, 12)
    with pytest.raises(UserError, match="pass@8 needs at least 8 samples per prompt, got 4"):
        evaluate_completions(task, rows, completions, k_values=(1, 8))
    with pytest.raises(UserError, match=r"raised ValueError on sample 0 \(prompt 'oops'"):
        evaluate_completions(task, [{"prompt": "oops"}], [["1"]])
