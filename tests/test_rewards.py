"""Rewards: the strict checker against adversarial completions, the format reward, and pluggable weighted
reward callables."""

import time

import pytest

from nanoseek.errors import ConfigError
from nanoseek.tasks import Rewards, accuracy_reward, extract_answer, format_reward, get_task

EOS = "<｜end▁of▁sentence｜>"
ADD = get_task("addition3")
P = ADD.problem(347, 589)  # 936
CD = get_task("countdown4")
Q = CD.problem([25, 5, 4, 3], 83)


def ok(answer: str, reasoning: str = "7+9=16") -> str:
    return f"{reasoning}\n</think>\n\n<answer>{answer}</answer>{EOS}"


def test_well_formed_answers_pass():
    assert ADD.check(ok("936"), P)
    assert ADD.check(ok(" 936 "), P)  # whitespace inside the tag is fine
    assert ADD.check(ok("936")[: -len(EOS)], P)  # no EOS (stopped exactly at the end)
    assert ADD.check("</think><answer>936</answer>\n", P)
    assert CD.check(ok("(25-5)*4+3"), Q) and CD.check(ok("3+4*(25-5)"), Q)


@pytest.mark.parametrize("completion", [
    "936",                                                     # no tags
    "the sum is 936" + EOS,                                    # no tags, EOS
    "<answer>936</answer>",                                    # think never closed
    "7+9=16\n<answer>936</answer>\n</think>\n\n",              # answer inside the reasoning
    "</think>\n\n936",                                         # no answer tag
    ok("<answer>936</answer>"),                                # nested tags
    "x</think><answer>936</answer><answer>936</answer>",       # repeated tags
    "x</think><answer>935</answer> <answer>936</answer>",      # several answers
    "x</think><answer>936</answer> or <answer>935</answer>",   # several answers, text between
    ok(""), ok("   "),                                         # empty answer
    ok("936") + " because 347+589=936",                        # text after the answer (after EOS)
    "x</think><answer>936</answer> because...",                # text after the answer
    "x</think>I think <answer>936</answer>",                   # text before the answer
    "x</think></think><answer>936</answer>",                   # two </think>
    "<think>x</think><answer>936</answer>",                    # a second <think>
    "x</think><answer>936",                                    # unclosed answer
    "x</think>936</answer>",                                   # unopened answer
    "x</think><answer>936</answer><｜User｜>hi",               # special tokens
    ok("+936"), ok("0936"), ok("936.0"), ok("9 36"), ok("9,36"), ok("936936"), ok("93"), ok("-936"),
    ok("9" * 100_000),                                         # huge number
    ok("1" + "0" * 4400),                                      # beyond int()'s digit limit
    ok("nine hundred thirty-six"),
])
def test_adversarial_completions_fail(completion):
    assert not ADD.check(completion, P)
    assert accuracy_reward([P.prompt], [completion], problem=[P]) == [0.0]


def test_huge_answers_are_cheap():
    t0 = time.perf_counter()
    for _ in range(20):
        ADD.check(ok("9" * 1_000_000), P)
        CD.check(ok("(" * 100_000), Q)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("answer", [
    "(25-5)*4+3=83",              # the target written out
    "25*4-5*3-2",                 # a number not given
    "(25-5)*4",                   # not every number used
    "(25-5)*4+3+3",               # a number used twice
    "25*3+4+5-1",                 # wrong numbers, right value
    "83",                         # just the target
    "(25-5)*4+3/(4-4)",           # division by zero (and 4 twice)
    "3/(5-5)*25+4",               # division by zero, each number once
    "__import__('os').system('true')",
    "(25-5)*4+3; 1",
    "(((((((((((((((((25-5)))))))))))))))))*4+3",  # too deeply nested
    "-(5-25)*4+3",                # unary minus
])
def test_adversarial_countdown_answers_fail(answer):
    assert not CD.check(ok(answer), Q)


def test_format_reward_ignores_correctness():
    completions = [ok("936"), ok("935"), "936", ok("")]
    assert format_reward([P.prompt] * 4, completions) == [1.0, 1.0, 0.0, 0.0]
    assert extract_answer(ok("935")) == "935"


def test_accuracy_reward_with_an_answer_column():
    assert accuracy_reward(["q", "q"], [ok("936"), ok("937")], answer=["936", "936"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="'problem' or an 'answer'"):
        accuracy_reward(["q"], [ok("936")])


def length_penalty(prompts, completions, **_):
    return [-len(c) / 1000 for c in completions]


def test_rewards_are_weighted_and_pluggable():
    rewards = Rewards({"accuracy": 1.0, "format": 0.1})
    rewards.add("short", length_penalty, 0.5)
    rewards.add("by_path", "test_rewards:length_penalty", 0.0)
    completions = [ok("936"), ok("935"), "junk"]
    total, parts = rewards([P.prompt] * 3, completions, problem=[P] * 3, truncated=[False] * 3)
    assert parts["accuracy"] == [1.0, 0.0, 0.0] and parts["format"] == [1.0, 1.0, 0.0]
    for i, c in enumerate(completions):
        expected = parts["accuracy"][i] + 0.1 * parts["format"][i] - 0.5 * len(c) / 1000
        assert total[i] == pytest.approx(expected)
    assert rewards.describe() == "1*accuracy + 0.1*format + 0.5*short + 0*by_path"


def test_bad_rewards_are_refused():
    with pytest.raises(ConfigError, match="unknown reward"):
        Rewards({"speed": 1.0})
    with pytest.raises(ConfigError, match="cannot load reward"):
        Rewards({"nowhere.module:fn": 1.0})
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        Rewards([("bad", lambda p, c, **_: [0.0], 1.0)])(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="non-finite"):
        Rewards([("nan", lambda p, c, **_: [float("nan")] * len(c), 1.0)])(["a"], ["x"])
    with pytest.raises(ValueError, match="one entry per completion"):
        Rewards({"format": 1.0})(["a"], ["x", "y"])
