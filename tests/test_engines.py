"""Rollout engines (pglm/engines.py) and the loop's correction of an engine that is not the trainer:
TorchEngine samples today's samples with the trainer's log-probs; a skewed fake engine gets exactly the
capped weights; a stale fake engine trips the alarm, a synced one does not."""

import copy
import json
import math

import pytest
import torch
from helpers import CopyEngine, move_adapters

import pglm.train.rl
from pglm.engines import TorchEngine, seed_uniforms
from pglm.models import build_model, model_config
from pglm.pg.presets import get_preset
from pglm.sampling import generate
from pglm.tasks import get_task
from pglm.train.rl import RLConfig, make_rl_optimizer, task_rows, train_rl


@pytest.fixture
def policy():
    tok = get_task("add2").tokenizer()
    torch.manual_seed(0)
    model = build_model(model_config("gpt", "tiny", vocab_size=tok.vocab_size, block_size=16, n_layer=1, d_model=32,
                                     n_head=2))
    return model.eval(), tok


def test_torch_engine_gives_the_samplers_samples_and_the_trainers_log_probs(policy):
    model, tok = policy
    prompts = [tok.prompt_ids(p) for p in ("12+34=", "7+5=", "99+99=")]
    seeds = [(3, 7, i) for i in (5, 6, 7)]
    engine = TorchEngine(model, tok.eos_id, tok.pad_id)
    g = engine.generate(prompts, 4, 4, 0.8, seeds)
    ref = generate(model, prompts, 4, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.8, group_size=4,
                   uniforms=seed_uniforms(seeds, 4, 4))
    assert torch.equal(g.tokens, ref.tokens) and torch.equal(g.logprobs, ref.logprobs)
    scored = engine.logprobs(g.tokens, g.n_pad, g.prompt_len, 0.8)
    assert torch.allclose(scored * g.response_mask, g.logprobs, atol=1e-5)
    assert engine.exact


def run(policy, tmp_path, engine, monkeypatch=None, **cfg):
    model, tok = policy
    task = get_task("add2")
    rl_cfg = RLConfig(algo="grpo", steps=3, prompts_per_step=4, group_size=4, lr=1e-3, eval_every=100,
                      ckpt_every=100, **cfg)
    seen = []
    tmp_path.mkdir(exist_ok=True)
    if monkeypatch is not None:  # the weights each policy loss is given
        real = pglm.train.rl.policy_loss

        def recording(*a, weights=None, **k):
            seen.append(weights)
            return real(*a, weights=weights, **k)

        monkeypatch.setattr(pglm.train.rl, "policy_loss", recording)
    def longer(prompts, completions, **_):  # a reward an untrained model's samples differ in: the policy moves
        return [float(len(c)) for c in completions]

    train_rl(model, tok, get_preset("grpo"), rl_cfg, task_rows(task, 0, 4), longer, None, 4, tmp_path,
             make_rl_optimizer(model, None, 1e-3, rl_cfg), progress=False, engine=engine(model, tok))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "rl"], seen


@pytest.mark.parametrize("delta, clipped", [(0.5, 0.0), (1.5, 1.0)])
def test_a_skewed_engine_gets_token_weights_min_ratio_c(policy, tmp_path, monkeypatch, delta, clipped):
    """Every engine log-prob δ below the trainer's: ρ = e^δ on every token, weight min(e^δ, 3)."""
    rows, seen = run(policy, tmp_path, lambda m, t: CopyEngine(m, t, skew=lambda g: delta), monkeypatch)
    for r in rows:
        assert r["logp_diff_mean"] == pytest.approx(delta, abs=1e-5)
        assert r["is_ratio_mean"] == pytest.approx(math.exp(delta), rel=1e-4)
        assert r["is_clip_frac"] == clipped and r["stale_weights"] is False and r["sync_s"] > 0
    for w in seen:
        assert torch.allclose(w[w > 0], torch.full_like(w[w > 0], min(math.exp(delta), 3.0)), rtol=1e-4)


def test_seq_mask_drops_the_skewed_sequences_and_keeps_the_others(policy, tmp_path, monkeypatch):
    """Even rows skewed by 2 per token (ρ_seq ≥ e² > 3: dropped), odd rows not (ρ = 1: weight 1)."""
    def skew(g):
        s = torch.zeros_like(g.logprobs)
        s[0::2] = 2.0
        return s

    rows, seen = run(policy, tmp_path, lambda m, t: CopyEngine(m, t, skew=skew), monkeypatch,
                     rollout_correction="seq_mask")
    for w in seen:
        assert torch.all(w[0::2] == 0)
        real = w[1::2][w[1::2] != 0]
        assert torch.allclose(real, torch.ones_like(real), atol=1e-4)
    assert all(r["is_clip_frac"] == 0.5 for r in rows)


def test_an_engine_without_skew_trains_as_pglms_own_sampler(policy, tmp_path):
    model, tok = policy
    torch_model, engine_model = copy.deepcopy(model), copy.deepcopy(model)
    run((torch_model, tok), tmp_path / "a", lambda m, t: TorchEngine(m, t.eos_id, t.pad_id))
    rows, _ = run((engine_model, tok), tmp_path / "b", lambda m, t: CopyEngine(m, t))
    assert all(r["logp_diff_max"] < 1e-5 and r["is_clip_frac"] == 0.0 for r in rows)
    a, b = torch_model.state_dict(), engine_model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_stale_engine_trips_the_alarm_and_a_synced_one_does_not(policy, tmp_path, capsys):
    model, tok = policy
    rows, _ = run((copy.deepcopy(model), tok), tmp_path / "stale", lambda m, t: CopyEngine(m, t, sync=False))
    assert [r["stale_weights"] for r in rows] == [True, True, True]
    assert "stale weights" in capsys.readouterr().out + capsys.readouterr().err
    rows, _ = run((copy.deepcopy(model), tok), tmp_path / "synced", lambda m, t: CopyEngine(m, t))
    assert [r["stale_weights"] for r in rows] == [False, False, False]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from helpers import tiny_sft_runs

    return tiny_sft_runs(tmp_path_factory.mktemp("engines"))


@pytest.mark.parametrize("flags, message", [
    (["--rollout-engine", "sglang"], "--rollout-engine must be torch or vllm"),
    (["--rollout-correction", "icepop"], "--rollout-correction must be none, token_tis, seq_mask"),
    (["--rollout-correction-cap", "1"], "--rollout-correction-cap"),
    (["--rollout-engine", "vllm", "--top-p", "0.9"], "no --top-k or --top-p"),
    (["--top-k", "5"], "no --top-k or --top-p"),
])
def test_bad_engine_flags_are_one_line(runs, tmp_path, capsys, flags, message):
    from helpers import error_line

    out = tmp_path / "rl"
    line = error_line(capsys, ["rl", "--init", str(runs / "gpt"), "--task", "add2", "--steps", "2", "--out", str(out),
                               "--quiet", *flags])
    assert message in line and not out.exists()


def test_vllm_with_an_lstm_or_without_vllm_is_one_line(runs, tmp_path, capsys):
    from helpers import error_line

    base = ["rl", "--task", "add2", "--steps", "2", "--quiet", "--rollout-engine", "vllm"]
    line = error_line(capsys, [*base, "--init", str(runs / "lstm"), "--out", str(tmp_path / "a")])
    assert "no LSTM architecture" in line and not (tmp_path / "a").exists()
    try:
        import vllm  # noqa: F401
    except ImportError:
        line = error_line(capsys, [*base, "--init", str(runs / "gpt"), "--out", str(tmp_path / "b")])
        assert "pip install -e '.[vllm]'" in line and not (tmp_path / "b").exists()


def test_a_gpt_reaches_the_engine_under_llamas_names_one_tensor_at_a_time(policy):
    from pglm.engines_vllm import hf_named
    from pglm.export import gpt_state_dict

    model, _ = policy
    streamed = hf_named(model, model.named_parameters())
    first = next(streamed)  # a generator: nothing is gathered or copied before it is asked for
    got = dict([first, *streamed])
    want = gpt_state_dict(model)  # what `pglm export` writes, and the engine was built from
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kind, targets", [("gpt2", ["c_attn", "c_fc"]), ("llama", ["q_proj", "v_proj", "down_proj"])])
def test_a_lora_policy_reaches_the_engine_merged(tmp_path, kind, targets):
    """Each adapted weight W + s·BA, as peft's merge_and_unload gives it (GPT-2's Conv1D transposed),
    under the base model's names; the adapters themselves are not sent."""
    from hf_models import make_hf_model

    from pglm.engines_vllm import hf_named
    from pglm.models.hf import add_lora, load_hf

    model = load_hf(str(make_hf_model(kind, tmp_path / kind)))
    add_lora(model, 2, 8.0, targets)  # s = α/r = 4
    move_adapters(model)  # B ≠ 0: the adapter moves the weights
    got = dict(hf_named(model, model.named_parameters()))
    want = copy.deepcopy(model.net).merge_and_unload().state_dict()
    base = {n: p for n, p in model.inner.named_parameters()}
    assert set(got) <= set(want)
    assert set(want) - set(got) <= {"lm_head.weight"}  # tied to the embedding: sent once, as the embedding
    for name in want.keys() & got.keys():
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    moved = [n for n in got if any(f".{t}." in n for t in targets) and n.endswith(".weight")]
    assert moved and all(not torch.allclose(got[n], base[n.replace(".weight", ".base_layer.weight")]) for n in moved)


def test_vllm_refuses_a_lora_adapter_on_an_embedding(tmp_path):
    from hf_models import make_hf_model

    from pglm.engines_vllm import check_vllm
    from pglm.errors import UserError
    from pglm.models.hf import add_lora, load_hf

    model = load_hf(str(make_hf_model("llama", tmp_path / "llama")))
    add_lora(model, 2, 8.0, ["embed_tokens", "q_proj"])
    with pytest.raises(UserError, match="embedding"):
        check_vllm(model)


def test_an_engine_sleeps_through_training_and_wakes_for_the_sync(policy, tmp_path, monkeypatch):
    """Each step: generate, then sleep while the trainer scores and updates, then wake, sync and probe."""
    calls = []

    class Recording(CopyEngine):
        def generate(self, *a, **k):
            calls.append("generate")
            return super().generate(*a, **k)

        def logprobs(self, *a, **k):
            calls.append("logprobs")
            return super().logprobs(*a, **k)

        def sync_weights(self, named_tensors):
            calls.append("sync")
            super().sync_weights(named_tensors)

        def sleep(self):
            calls.append("sleep")

        def wake(self):
            calls.append("wake")

    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        calls.append("optimizer")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run(policy, tmp_path, lambda m, t: Recording(m, t))
    per_step = ["generate", "sleep", "optimizer", "wake", "sync", "logprobs"]
    assert calls == ["sync"] + per_step * 3  # synced once before the first rollout
