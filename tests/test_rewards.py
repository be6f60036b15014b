"""Rewards: the spec loader and its errors, call_reward's checks, combine, and the built-ins by hand."""

import builtins
import math
import sys
import textwrap

import pytest

from pglm.errors import UserError
from pglm.rewards import (
    bleu,
    call_reward,
    chrf,
    combine,
    exact_match,
    format_regex,
    hf_reward_model,
    length_penalty,
    load_reward,
    load_rewards,
    numeric_match,
    soft_overlong,
)

P = ["1+2=", "3+4=", "5+6="]


@pytest.fixture
def reward_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(textwrap.dedent("""
        import math

        NOT_CALLABLE = 3

        def length(prompts, completions, **columns):
            return [float(len(c)) for c in completions]

        def raises_on_bad(prompts, completions, **columns):
            return [float(int(c)) for c in completions]

        def nan_on_second(prompts, completions, **columns):
            return [math.nan if p == "3+4=" else 1.0 for p in prompts]

        def too_short(prompts, completions, **columns):
            return [1.0] * (len(completions) - 1)

        def strings(prompts, completions, **columns):
            return ["1.0" for _ in completions]

        def batch_only(prompts, completions, **columns):
            if len(prompts) > 1:
                raise RuntimeError("batch too big")
            return [0.0]
    """))
    return f


# ---- load_reward -------------------------------------------------------------------------------


def test_load_file_function(reward_file):
    fn = load_reward(f"{reward_file}:length")
    assert fn(P, ["ab", "", "abcd"]) == [2.0, 0.0, 4.0]
    assert load_reward(f"{reward_file}:length") is fn  # imported once, not re-executed


def test_load_module_function(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    try:
        fn = load_reward("my_rewards:length")
        assert fn.__module__ == "my_rewards"
        assert fn(P[:1], ["xyz"]) == [3.0]
        assert load_reward("math:sqrt") is math.sqrt
        assert load_reward("builtin:exact_match") is exact_match
    finally:
        sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, expected", [
    ("no_colon_here", "has no ':'"),
    (":f", "has no ':'"),
    ("math:", "names no function after the ':'"),
    ("pglm_no_such_module_xyz:f", "cannot import module 'pglm_no_such_module_xyz' (No module named"),
    ("does/not/exist.py:f", "file does/not/exist.py does not exist"),
    ("math:no_such_fn", "math has no attribute 'no_such_fn'"),
    ("math:pi", "pi is a float, not a function"),
    ("builtin:nope", "no built-in reward 'nope'; choose one of exact_match, numeric_match, chrf, bleu"),
])
def test_bad_specs(spec, expected):
    with pytest.raises(UserError) as e:
        load_reward(spec)
    msg = str(e.value)
    assert expected in msg
    assert repr(spec) in msg and "\n" not in msg


def test_bad_specs_in_a_file(reward_file, tmp_path):
    with pytest.raises(UserError, match=r"my_rewards.py has no attribute 'nope'"):
        load_reward(f"{reward_file}:nope")
    with pytest.raises(UserError, match=r"NOT_CALLABLE is a int, not a function"):
        load_reward(f"{reward_file}:NOT_CALLABLE")
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\nraise KeyError('oops')\n")
    with pytest.raises(UserError, match=r"importing .*broken.py raised KeyError: 'oops' at broken.py:2"):
        load_reward(f"{broken}:f")


# ---- call_reward ---------------------------------------------------------------------------------


def test_call_reward_passes_good_values(reward_file):
    assert call_reward(load_reward(f"{reward_file}:length"), P, ["a", "bb", "ccc"], {}) == [1.0, 2.0, 3.0]


def test_call_reward_names_the_sample_that_raises(reward_file):
    fn = load_reward(f"{reward_file}:raises_on_bad")
    with pytest.raises(UserError) as e:
        call_reward(fn, P, ["3", "7", "eleven"], {})
    msg = str(e.value)
    assert msg.startswith(f"reward {reward_file.resolve()}:raises_on_bad raised")
    assert ":raises_on_bad raised ValueError on sample 2 (prompt '5+6=', completion 'eleven')" in msg
    assert "at my_rewards.py:" in msg and "invalid literal" in msg


def test_call_reward_batch_only_failure(reward_file):
    with pytest.raises(UserError, match=r"batch_only raised RuntimeError on a batch of 3 samples"):
        call_reward(load_reward(f"{reward_file}:batch_only"), P, ["a", "b", "c"], {})


def test_call_reward_nan_wrong_length_non_number(reward_file):
    with pytest.raises(UserError, match=r"nan_on_second returned nan for sample 1 \(prompt '3\+4=', completion 'y'\)"):
        call_reward(load_reward(f"{reward_file}:nan_on_second"), P, ["x", "y", "z"], {})
    with pytest.raises(UserError, match=r"too_short returned 2 values for 3 completions"):
        call_reward(load_reward(f"{reward_file}:too_short"), P, ["x", "y", "z"], {})
    with pytest.raises(UserError, match=r"strings returned \"'1.0'\" \(str\) for sample 0"):
        call_reward(load_reward(f"{reward_file}:strings"), P, ["x", "y", "z"], {})


def test_call_reward_rejects_inf_and_truncates_long_text():
    def inf_reward(prompts, completions, **columns):
        return [0.0, math.inf]

    with pytest.raises(UserError) as e:
        call_reward(inf_reward, ["p", "q" * 100], ["c", "d" * 100], {})
    msg = str(e.value)
    assert "test_rewards:test_call_reward_rejects_inf_and_truncates_long_text.<locals>.inf_reward" in msg
    assert "returned inf for sample 1" in msg
    assert f"prompt '{'q' * 57}...'" in msg and f"completion '{'d' * 57}...'" in msg


def test_call_reward_slices_columns_when_locating():
    seen = []

    def picky(prompts, completions, answer):
        seen.append(list(answer))
        if "bad" in answer:
            raise KeyError("bad")
        return [1.0] * len(prompts)

    with pytest.raises(UserError, match="on sample 1"):
        call_reward(picky, P[:2], ["x", "y"], {"answer": ["ok", "bad"]})
    assert seen == [["ok", "bad"], ["ok"], ["bad"]]


# ---- combine / load_rewards ---------------------------------------------------------------------


def test_combine_weights_by_hand(reward_file):
    length = load_reward(f"{reward_file}:length")
    both = combine([(length, 0.5), (exact_match, 2.0)])
    # "12": 0.5*2 + 2*0 = 1.0 ; "7": 0.5*1 + 2*1 = 2.5 ; "":  0.5*0 + 2*0 = 0
    assert both(P, ["12", "7", ""], answer=["3", "7", "11"]) == [1.0, 2.5, 0.0]
    assert "0.5*" in both.__name__ and "2*pglm.rewards.builtin:exact_match" in both.__name__
    same = load_rewards([f"{reward_file}:length", "builtin:exact_match"], [0.5, 2.0])
    assert same(P, ["12", "7", ""], answer=["3", "7", "11"]) == [1.0, 2.5, 0.0]
    assert load_rewards(["builtin:exact_match"]) is exact_match


def test_combine_reports_the_inner_function(reward_file):
    both = combine([(exact_match, 1.0), (load_reward(f"{reward_file}:nan_on_second"), 1.0)])
    with pytest.raises(UserError, match=r"nan_on_second returned nan for sample 1"):
        call_reward(both, P, ["x", "y", "z"], {"answer": ["1", "2", "3"]})


def test_load_rewards_weight_count():
    with pytest.raises(UserError, match="2 rewards but 1 weights"):
        load_rewards(["builtin:exact_match", "builtin:chrf"], [1.0])
    with pytest.raises(UserError, match="no reward given"):
        load_rewards([])


# ---- built-ins -----------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match(P, [" 3 ", "7", "011"], answer=["3", " 7\n", "11"]) == [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="needs an 'answer' column"):
        exact_match(P, ["3", "7", "11"])


def test_numeric_match():
    completions = ["the answer is 3.0000001", "-7 apples", "1e1 then 11", "no number", "11"]
    answers = ["3", "-7", "10", "0", "11.5"]
    assert numeric_match(["p"] * 5, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert numeric_match(["p"], ["3.000002"], answer=["3"]) == [0.0]  # outside 1e-6
    with pytest.raises(ValueError, match="answer 'abc' is not a number"):
        numeric_match(["p"], ["1"], answer=["abc"])


def test_format_regex():
    fn = format_regex(r"\d+")
    assert fn(["p"] * 4, [" 12 ", "12x", "", "007"]) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(UserError, match="not a valid regular expression"):
        format_regex("(")


def test_length_penalty_by_hand():
    # max_len 10, cache 4: free up to 6, then (6 - L)/4, -1 beyond 10.
    expected = {0: 0.0, 6: 0.0, 7: -0.25, 8: -0.5, 10: -1.0, 11: -1.0, 50: -1.0}
    assert {n: soft_overlong(n, 10, 4) for n in expected} == expected
    fn = length_penalty(10, 4)
    assert fn(["p"] * 3, ["x" * 6, "x" * 7, "x" * 11]) == [0.0, -0.25, -1.0]
    half = length_penalty(10, 4, factor=0.5, tokens=True)
    assert half(["p"] * 2, ["ignored", ""], completion_lengths=[8, 3]) == [-0.25, 0.0]
    with pytest.raises(UserError, match="needs the column 'completion_lengths'"):
        half(["p"], ["x"])
    with pytest.raises(UserError, match="need 0 < cache_len <= max_len"):
        length_penalty(10, 11)


def test_chrf_and_bleu_in_unit_range():
    ref = "the cat sat on the mat"
    c = ["the cat sat on the mat", "a dog ran in the park", "the cat sat on a mat"]
    for fn in (chrf, bleu):
        scores = fn(["p"] * 3, c, answer=[ref] * 3)
        assert scores[0] == 1.0  # identical text: sacrebleu's 100, divided by 100
        assert 0.0 <= scores[1] < scores[2] < 1.0


def test_sacrebleu_missing_is_a_user_error(monkeypatch):
    real_import = builtins.__import__

    def no_sacrebleu(name, *args, **kwargs):
        if name == "sacrebleu":
            raise ImportError("no sacrebleu")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sacrebleu)
    with pytest.raises(UserError, match="pip install sacrebleu"):
        chrf(["p"], ["x"], answer=["x"])


def test_hf_reward_model_without_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'pglm\[hf\]'"):
            hf_reward_model("/nonexistent")
    else:
        pytest.skip("transformers is installed; the missing-package error cannot happen")


def test_hf_reward_model_scores(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5, "q": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16, num_labels=1)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    fn = hf_reward_model(tmp_path, batch_size=2)
    scores = fn(["q", "q", "q"], ["good", "bad", "good"])
    assert len(scores) == 3 and scores[0] == pytest.approx(scores[2]) and scores[0] != scores[1]


def test_a_reward_that_exits_hangs_or_overflows_is_one_line():
    import time

    from pglm.rewards.loader import call_reward

    def exits(prompts, completions, **kw):
        raise SystemExit(3)

    def hangs(prompts, completions, **kw):
        time.sleep(30)
        return [0.0] * len(completions)

    def huge(prompts, completions, **kw):
        return [1e308] * len(completions)

    with pytest.raises(UserError, match=r"called sys.exit\(3\) on sample 0"):
        call_reward(exits, ["p"], ["c"])
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="did not return within 0.2 s on a batch of 1 samples.*--reward-timeout"):
        call_reward(hangs, ["p"], ["c"], timeout=0.2)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(UserError, match=r"returned 1e\+308 .* scale the reward down"):
        call_reward(huge, ["p"], ["c"])
