"""A next-word softmax policy, its score function, and REINFORCE worked by hand.

After the prompt 今天天气很好 ("the weather is nice today") a toy language model picks the next word
from four candidates. Its policy is pi(w) = softmax(theta)_w, started at theta = log p so that pi = p.

1. The score function grad_theta log pi(w) = onehot(w) - pi, by the formula and by autograd.
2. A few steps of gradient ascent on J(theta) = E_{w~pi}[R(w)] with one sampled word per step:
   the REINFORCE estimate g_hat = R(w) * grad log pi(w) (Williams 1992, "Simple statistical
   gradient-following algorithms", eq. 11 without a baseline).
3. The exact gradient grad J = sum_w pi(w) R(w) grad log pi(w), by enumerating all four words.

    python examples/softmax_policy.py [--steps 5] [--lr 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import unicodedata

import torch

PROMPT = "今天天气很好"
WORDS = ["今天", "明天", "昨天", "星期"]
GLOSS = ["today", "tomorrow", "yesterday", "week"]
P0 = [0.5, 0.3, 0.1, 0.1]
# The task: continue the sentence with tomorrow's weather, so 明天 earns 1 and every other word 0.
# A 0/1 reward keeps the arithmetic visible: a word with R = 0 contributes nothing to g_hat, so a
# step that samples it leaves theta exactly where it was.
REWARD = [0.0, 1.0, 0.0, 0.0]


def pad(text: str, width: int) -> str:
    """Left-justify to `width` terminal columns; CJK characters take two columns each."""
    cols = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(width - cols, 0)


def policy(theta: torch.Tensor) -> torch.Tensor:
    return torch.softmax(theta, dim=-1)  # (V,) logits -> (V,) probabilities


def score(theta: torch.Tensor, w: int) -> torch.Tensor:
    """grad_theta log pi(w): d/d theta_j [theta_w - logsumexp(theta)] = [j == w] - softmax(theta)_j."""
    return torch.nn.functional.one_hot(torch.tensor(w), len(theta)).to(theta.dtype) - policy(theta)


def score_autograd(theta: torch.Tensor, w: int) -> torch.Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    torch.log_softmax(theta, dim=-1)[w].backward()
    return theta.grad


def reinforce_estimate(theta: torch.Tensor, w: int) -> torch.Tensor:
    """g_hat = R(w) * grad log pi(w) for one sampled word w."""
    return REWARD[w] * score(theta, w)


def exact_gradient(theta: torch.Tensor) -> torch.Tensor:
    """grad J = sum_w pi(w) R(w) grad log pi(w): the expectation of g_hat, enumerated."""
    p = policy(theta)
    return sum(p[w] * reinforce_estimate(theta, w) for w in range(len(WORDS)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="gradient-ascent steps, one sampled word each")
    parser.add_argument(
        "--lr", type=float, default=1.0, help="step size alpha in theta <- theta + alpha * g_hat"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator that samples words")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be 0 or more, got {args.steps}")
    if not math.isfinite(args.lr):
        parser.error(f"--lr must be a finite number, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    labels = [f"{w} {g}" for w, g in zip(WORDS, GLOSS)]
    theta = torch.tensor(P0, dtype=torch.float64).log()  # float64 so formula and autograd agree to 1e-12
    theta0, p_start = theta.clone(), policy(theta)

    print(f'Prompt: {PROMPT} ("the weather is nice today"); next-word policy pi = softmax(theta)\n')
    header = pad("word", 16) + pad("pi(w)", 8) + pad("grad log pi(w) = onehot(w) - pi", 44)
    print(header + "|formula - autograd|")
    scores = []
    for w in range(len(WORDS)):
        by_formula, by_autograd = score(theta, w), score_autograd(theta, w)
        gap = (by_formula - by_autograd).abs().max().item()
        assert gap <= 1e-12, f"score of {WORDS[w]}: formula and autograd differ by {gap:.3g}"
        scores.append(by_formula.tolist())
        vec = " ".join(f"{x:+.4f}" for x in by_formula.tolist())
        print(pad(labels[w], 16) + f"{p_start[w].item():<8.4f}[{vec}]    {gap:.1e}")

    print(
        f"\nReward R: {', '.join(f'{w} {r:g}' for w, r in zip(WORDS, REWARD))}. "
        f"Gradient ascent theta <- theta + {args.lr:g} * R(w) * grad log pi(w)\n"
    )
    print(pad("step", 6) + pad("sampled", 16) + pad("R", 4) + "  ".join(pad(f"pi({w})", 8) for w in WORDS))
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for step in range(1, args.steps + 1):
        w = int(torch.multinomial(policy(theta), 1, generator=gen))  # w ~ pi
        theta = theta + args.lr * reinforce_estimate(theta, w)  # ascent: we maximise expected reward
        p = policy(theta)
        rows.append(
            {
                "step": step,
                "word": WORDS[w],
                "reward": REWARD[w],
                "theta": theta.tolist(),
                "probs": p.tolist(),
            }
        )
        print(
            pad(str(step), 6)
            + pad(labels[w], 16)
            + pad(f"{REWARD[w]:g}", 4)
            + "  ".join(f"{x:<8.4f}" for x in p.tolist()).rstrip()
        )

    grad_j = exact_gradient(theta0)
    # Cross-check with autograd on J(theta) = sum_w pi(w) R(w) itself: the log-derivative trick
    # grad pi = pi * grad log pi is what turns this into an expectation that sampling can estimate.
    theta_req = theta0.clone().requires_grad_(True)
    (policy(theta_req) @ torch.tensor(REWARD, dtype=torch.float64)).backward()
    assert (grad_j - theta_req.grad).abs().max().item() <= 1e-12, "exact gradient disagrees with autograd"
    print("\nExact gradient at the start, grad J = sum_w pi(w) R(w) grad log pi(w):")
    print("  [" + " ".join(f"{x:+.4f}" for x in grad_j.tolist()) + "]   (order: " + " ".join(WORDS) + ")")
    print("E[g_hat] = grad J: REINFORCE is unbiased, so the steps above follow grad J on average.")
    print(
        "Maximum likelihood is the special case R = 1 on the observed word: its gradient is grad log pi(w_data)."
    )
    return {
        "initial_theta": theta0.tolist(),
        "initial_probs": p_start.tolist(),
        "scores": scores,
        "rows": rows,
        "final_probs": policy(theta).tolist(),
        "exact_gradient": grad_j.tolist(),
    }


if __name__ == "__main__":
    main()
