"""Reward models from preference pairs: the data, the Bradley–Terry loss, its step and its evaluation.

A preference pair says that a rater preferred completion c to completion c' of the same prompt x.
Under the Bradley–Terry model P(c ≻ c' | x) = σ(r(x, c) − r(x, c')), so maximum likelihood of the
raters' choices is the loss

    L = −log σ(r_c − r_r − m)  +  η (r_c + r_r)²

with m the pair's margin when the data gives one (Llama 2, Touvron et al. 2023, §3.2.2: a larger
margin for a clearer preference) and η the centring coefficient of TRL's `center_rewards_coefficient`
(Eisenstein et al. 2023), which pins the scores' free offset near 0. Training runs in the loop of
`pglm.train.mle` (it is maximum likelihood), with `reward_step` as its step and `evaluate_pairs` as its
validation; docs/reward.md says how to use it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pglm import dist
from pglm.data import jsonl_rows, source_files
from pglm.errors import UserError
from pglm.models.reward import padded, pair_ids


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0, n_pairs: torch.Tensor | int | None = None) -> torch.Tensor:
    """Σ over pairs of −log σ(r_c − r_r − m) + η (r_c + r_r)², divided by n_pairs (default: the pairs here).

    r_chosen, r_rejected, margin: (B,). n_pairs is the pair count of the whole optimizer step when it
    spans several micro-batches or ranks, so that their gradients add up to the gradient of the mean."""
    d = r_chosen - r_rejected - (margin if margin is not None else 0.0)  # (B,)
    loss = -F.logsigmoid(d)  # (B,)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss.sum() / (r_chosen.numel() if n_pairs is None else n_pairs)


@dataclass
class PairExample:
    chosen: list[int]  # bos + prompt + chosen + eos
    rejected: list[int]  # bos + prompt + rejected + eos
    margin: float


@dataclass
class PairBatch:
    x: torch.Tensor  # (2B, T) right-padded: the B chosen sequences, then the B rejected ones
    mask: torch.Tensor  # (2B, T) True on real tokens
    margin: torch.Tensor  # (B,)

    @property
    def n_pairs(self) -> int:
        return self.margin.shape[0]

    def to(self, device) -> PairBatch:
        return PairBatch(self.x.to(device, non_blocking=True), self.mask.to(device, non_blocking=True),
                         self.margin.to(device, non_blocking=True))


def pair_batch(examples: list[PairExample], pad_id: int) -> PairBatch:
    x, mask = padded([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
    return PairBatch(x, mask, torch.tensor([e.margin for e in examples], dtype=torch.float32))


def _text(value, where: str, field: str) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise UserError(f"{where}: '{field}' must be text or a list of chat messages ({{\"role\": ..., \"content\": ...}}); "
                    'write rows such as {"prompt": "2+2=", "chosen": "4", "rejected": "5"}')


def preference_texts(row: dict, where: str, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text. Chat rows, as TRL's preference datasets have them: the prompt
    (a list of messages; absent when chosen and rejected are whole conversations, TRL's "implicit
    prompt") goes through the tokenizer's chat template, ready for the assistant's turn, and a
    completion is the content of its assistant message, so a pair reads as a policy's sample does."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise UserError(f"{where}: no '{missing[0]}' field; preference rows need 'chosen' and 'rejected' "
                        '(and usually \'prompt\'), e.g. {"prompt": "2+2=", "chosen": "4", "rejected": "5"}')
    prompt = _text(row.get("prompt", ""), where, "prompt") if row.get("prompt", "") != "" else ""
    chosen, rejected = _text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")
    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both chat messages")
        if not prompt:  # implicit prompt: the messages the two conversations share
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                raise UserError(f"{where}: '{side}' must be one assistant message after the prompt; "
                                "multi-turn completions are not supported")
        return tokenizer.render_chat(prompt), chosen[0]["content"], rejected[0]["content"]
    return prompt, chosen, rejected


def read_preferences(src: str, tokenizer, context: int | None) -> list[PairExample]:
    """Preference pairs from JSONL rows {"prompt", "chosen", "rejected"[, "margin"]}; pairs longer
    than the model's context are left out (said on stderr; TRL's trainer filters them the same way)."""
    import sys

    files = source_files(src)
    if not files:
        raise UserError(f"{src}: no preference data; pass a JSONL file of rows with 'prompt', 'chosen' and 'rejected'")
    examples, too_long, same = [], 0, 0
    for file in files:
        for lineno, row in jsonl_rows(file):
            where = f"{file}:{lineno}"
            prompt, chosen, rejected = preference_texts(row, where, tokenizer)
            margin = row.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin or abs(margin) > 1e6:
                raise UserError(f"{where}: 'margin' must be a finite number, not {margin!r}")
            try:
                c, r = pair_ids(tokenizer, prompt, chosen), pair_ids(tokenizer, prompt, rejected)
            except UserError as e:
                raise UserError(f"{where}: the tokenizer cannot encode this pair ({e}); train the model on "
                                "text like it first") from None
            if c == r:
                same += 1
                continue
            if context is not None and max(len(c), len(r)) > context:
                too_long += 1
                continue
            examples.append(PairExample(c, r, float(margin)))
    if not examples:
        if same:
            raise UserError(f"{src}: in every pair 'chosen' and 'rejected' are the same text, which teaches no "
                            "preference; write pairs of two different completions")
        if too_long:
            raise UserError(f"{src}: every pair is longer than the model's context of {context} tokens; "
                            "shorten the texts or use a model with a longer context")
        raise UserError(f"{src} holds no pairs; add rows such as {{\"prompt\": \"2+2=\", \"chosen\": \"4\", "
                        "\"rejected\": \"5\"}")
    if (too_long or same) and dist.is_main():
        print(f"reward: left out {too_long} pair(s) longer than the context of {context} tokens and {same} whose "
              f"two completions are the same; {len(examples)} remain", file=sys.stderr)
    return examples


def reward_step(model, optimizer, micro: list[PairBatch], grad_clip: float, autocast=contextlib.nullcontext,
                dropout_seeds: list[int] | None = None, center_coef: float = 0.0):
    """One optimizer step of the Bradley–Terry loss over this rank's micro-batches (as `mle_step`).

    Returns (loss, grad_norm) as 0-d tensors, unsynced; the loss is this rank's share."""
    from pglm.train.mle import clip_and_step

    n_pairs = dist.all_sum(torch.tensor(float(sum(b.n_pairs for b in micro)), device=micro[0].x.device))
    W = dist.world_size()
    losses = []
    for i, b in enumerate(micro):
        if dropout_seeds is not None:
            torch.manual_seed(dropout_seeds[i])
        with dist.grad_sync(model, i == len(micro) - 1):
            with autocast():
                scores = model(b.x, b.mask)  # (2B,): chosen then rejected, one forward
            rc, rr = scores[: b.n_pairs], scores[b.n_pairs :]
            loss = bradley_terry_loss(rc, rr, b.margin, center_coef, n_pairs)
            (loss * W if W > 1 else loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum(), clip_and_step(model, optimizer, grad_clip)


@torch.no_grad()
def evaluate_pairs(model, batches, device="cpu", autocast=None, center_coef: float = 0.0) -> dict:
    """Held-out pairwise accuracy (r_c > r_r; a tie counts half), mean margin r_c − r_r and loss.

    With several processes, batch i is scored on rank i mod W, every rank running as many forwards
    (under FSDP2 each is a collective), as `pglm.evaluate.evaluate_lm` does."""
    was_training = model.training
    model.eval()
    batches = list(batches)
    W, r = dist.world_size(), dist.rank()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # Σ loss, Σ correct, Σ margin, Σ pairs
    for k in range(-(-len(batches) // W)):
        i = k * W + r
        b = batches[min(i, len(batches) - 1)].to(device)
        with autocast() if autocast else contextlib.nullcontext():
            scores = model(b.x, b.mask).double()  # (2B,)
        if i >= len(batches):
            continue
        rc, rr = scores[: b.n_pairs], scores[b.n_pairs :]
        totals += torch.stack([bradley_terry_loss(rc, rr, b.margin.double(), center_coef, 1),
                               (rc > rr).sum() + 0.5 * (rc == rr).sum(), (rc - rr).sum(),
                               torch.tensor(float(b.n_pairs), dtype=torch.float64, device=device)])
    loss, correct, margin, n = dist.all_sum(totals).tolist()
    model.train(was_training)
    if n == 0:
        return {"val_pairs": 0}
    return {"val_loss": loss / n, "val_accuracy": correct / n, "val_margin": margin / n, "val_pairs": int(n)}
