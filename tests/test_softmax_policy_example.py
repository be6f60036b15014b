"""Checks on examples/softmax_policy.py, with the expected numbers worked out by hand below.

Policy after 今天天气很好: p = [今天 0.5, 明天 0.3, 昨天 0.1, 星期 0.1]; reward 1 for 明天, else 0.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "softmax_policy.py"
P = np.array([0.5, 0.3, 0.1, 0.1])
TOMORROW = 1  # index of 明天, the only word with reward 1
REWARD = np.array([0.0, 1.0, 0.0, 0.0])
LR, STEPS, SEED = 0.5, 8, 0  # seed 0 samples both 明天 and a reward-0 word within 8 steps


def load_example():
    spec = importlib.util.spec_from_file_location("softmax_policy_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def result(example):
    return example.main(["--steps", str(STEPS), "--lr", str(LR), "--seed", str(SEED)])


def softmax(theta):
    e = np.exp(theta - theta.max())
    return e / e.sum()


def test_initial_probabilities_are_the_given_four(result):
    # softmax(log p) rounds through log and exp, so 0.3 comes back as 0.29999999999999993:
    # equal to the last bit or two of a float64, which is as exact as this computation can be.
    np.testing.assert_allclose(result["initial_probs"], P, rtol=0, atol=1e-15)


def test_score_rows_are_onehot_minus_p_and_sum_to_zero(result):
    # By hand, e.g. for 明天: [0, 1, 0, 0] - [0.5, 0.3, 0.1, 0.1] = [-0.5, +0.7, -0.1, -0.1].
    scores = np.array(result["scores"])
    assert scores.shape == (4, 4)
    np.testing.assert_allclose(scores.sum(axis=1), 0.0, atol=1e-15)
    np.testing.assert_allclose(scores, np.eye(4) - P, rtol=0, atol=1e-15)


def test_each_step_is_one_reinforce_update(result):
    rows = result["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    theta = np.log(P)
    for row in rows:
        w = ["今天", "明天", "昨天", "星期"].index(row["word"])
        assert row["reward"] == REWARD[w]
        # Replay the step independently: theta <- theta + lr * R(w) * (onehot(w) - softmax(theta)).
        theta = theta + LR * REWARD[w] * (np.eye(4)[w] - softmax(theta))
        np.testing.assert_allclose(row["theta"], theta, rtol=0, atol=1e-12)
        np.testing.assert_allclose(row["probs"], softmax(theta), rtol=0, atol=1e-12)
        assert math.isclose(sum(row["probs"]), 1.0, abs_tol=1e-12)
    np.testing.assert_allclose(result["final_probs"], rows[-1]["probs"], rtol=0, atol=0)


def test_reward_one_raises_its_word_and_reward_zero_leaves_theta_alone(result):
    before_theta, before_probs = result["initial_theta"], result["initial_probs"]
    rewards_seen = set()
    for row in result["rows"]:
        rewards_seen.add(row["reward"])
        if row["reward"] == 1.0:
            assert row["word"] == "明天"
            assert row["probs"][TOMORROW] > before_probs[TOMORROW]
        else:
            assert row["theta"] == before_theta  # bit for bit: g_hat = 0 * score = 0
        before_theta, before_probs = row["theta"], row["probs"]
    # Both branches above must have run, or this test would pass without checking anything.
    assert rewards_seen == {0.0, 1.0}


def test_exact_gradient_by_hand(result):
    # grad J = sum_w p(w) R(w) (onehot(w) - p) = 0.3 * ([0, 1, 0, 0] - p) = [-0.15, +0.21, -0.03, -0.03].
    np.testing.assert_allclose(result["exact_gradient"], [-0.15, 0.21, -0.03, -0.03], rtol=0, atol=1e-15)


def test_reinforce_is_unbiased_against_the_exact_gradient(example, result):
    n = 20_000
    theta0 = torch.tensor(result["initial_theta"], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    words = torch.multinomial(torch.tensor(P), n, replacement=True, generator=gen)  # (n,)
    # Only four distinct g_hat values exist, so build them once and index: (4, 4)[words] -> (n, 4).
    per_word = torch.stack([example.reinforce_estimate(theta0, w) for w in range(4)])
    g_hat = per_word[words].numpy()
    mean, stderr = g_hat.mean(axis=0), g_hat.std(axis=0, ddof=1) / math.sqrt(n)
    assert (stderr > 0).all()
    assert (np.abs(mean - np.array(result["exact_gradient"])) <= 5 * stderr).all(), (mean, stderr)


def test_same_seed_same_run_and_bad_flag_is_refused(example, result):
    again = example.main(["--steps", str(STEPS), "--lr", str(LR), "--seed", str(SEED)])
    assert again["rows"] == result["rows"]
    with pytest.raises(SystemExit):
        example.main(["--steps", "-1"])
