"""Rewards: the strict checker against adversarial completions, the format reward, pluggable weighted
reward callables (built-in, module:function, file.py:function) with the dataset's columns, their errors
(at recipe load and during a run), and a tiny GRPO run whose file reward reads a task column."""

import json
import math
import re
import time

import pytest

from nanoseek.errors import ConfigError
from nanoseek.tasks import Problem, Rewards, accuracy_reward, extract_answer, format_reward, get_task
from nanoseek.tasks.rewards import RewardError, reward_columns

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
    with pytest.raises(ConfigError, match="cannot import module 'nowhere.module': ModuleNotFoundError"):
        Rewards({"nowhere.module:fn": 1.0})
    with pytest.raises(ConfigError, match="module test_rewards has no function 'nothing'.*length_penalty"):
        Rewards({"test_rewards:nothing": 1.0})
    with pytest.raises(ConfigError, match="'EOS' in module test_rewards is a str, not a function"):
        Rewards({"test_rewards:EOS": 1.0})
    with pytest.raises(ConfigError, match="non-numeric weight True"):
        Rewards({"format": True})
    with pytest.raises(ConfigError, match="two rewards are named 'length_penalty'"):
        Rewards({"test_rewards:length_penalty": 1.0, "tests.test_rewards:length_penalty": 1.0})
    with pytest.raises(RewardError, match="column 'prompts' has 1 entries for 2 completions"):
        Rewards({"format": 1.0})(["a"], ["x", "y"])
    with pytest.raises(RewardError, match="column 'answer' has 1 entries for 2 completions"):
        Rewards({"format": 1.0})(["a", "b"], ["x", "y"], answer=["1"])


# ---- your own rewards: files, columns, errors -----------------------------------------------------
REWARD_FILE = """
def gold_length(prompts, completions, answer, data_answer, source, **_):
    # reads dataset columns: the gold answer, the raw answer column, and a column of its own
    return [float(len(a)) + (0.5 if s == "gsm8k" else 0.0) for a, s in zip(answer, source)]

def odd_only(prompts, completions, a, **_):
    return [1.0 if x % 2 else None for x in a]

def crash_on_b(prompts, completions, **_):
    return [1.0 / (c != "b") for c in completions]

def batch_only(prompts, completions, **_):
    if len(completions) > 1:
        raise RuntimeError("needs one completion")
    return [0.0]

def nan_second(prompts, completions, **_):
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]

def inf_first(prompts, completions, **_):
    return [float("inf")] + [0.0] * (len(completions) - 1)

def text_value(prompts, completions, **_):
    return ["1.0"] * len(completions)

def one_value(prompts, completions, **_):
    return [0.0]

def a_number(prompts, completions, **_):
    return 3.0

NOT_A_FUNCTION = 7
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "rewards_dir" / "my_rewards.py"
    path.parent.mkdir()
    path.write_text(REWARD_FILE)
    return path


GSM = [Problem("gsm8k", "Natalia sold 48 clips in April and half as many in May. How many in all?", "72",
               {"question": "Natalia sold 48 clips ...", "answer": "48/2 = 24\n48+24 = 72\n#### 72",
                "source": "gsm8k"}),
       Problem("gsm8k", "What is 10 * 10?", "100", {"question": "What is 10 * 10?", "answer": "#### 100",
                                                    "source": "other", "level": 3})]


def test_reward_columns_carry_every_dataset_column_per_completion():
    problems = [p for p in GSM for _ in range(2)]  # G = 2 samples per problem
    columns = reward_columns(problems, [False, True, False, False])
    assert list(columns) == ["problem", "answer", "truncated", "question", "data_answer", "source", "level"]
    assert columns["answer"] == ["72", "72", "100", "100"]  # the gold answer; the raw column is data_answer
    assert columns["data_answer"][0].endswith("#### 72") and columns["truncated"] == [False, True, False, False]
    assert columns["source"] == ["gsm8k", "gsm8k", "other", "other"]
    assert columns["level"] == [None, None, 3, 3]  # a key only some rows have
    assert columns["problem"] == problems
    # a built-in task's fields are columns too
    assert reward_columns([P], [False])["a"] == [347] and reward_columns([Q], [False])["target"] == [83]
    clash = Problem("gsm8k", "q", "1", {"answer": "#### 1", "data_answer": "x"})
    with pytest.raises(RewardError, match="columns 'answer' and 'data_answer' would both be passed to rewards "
                                          "as 'data_answer'"):
        reward_columns([clash], [False])


def test_a_file_reward_reads_dataset_columns(reward_file):
    rewards = Rewards({"format": 0.1, "my_rewards.py:gold_length": 2.0}, base=reward_file.parent)
    problems = [p for p in GSM for _ in range(2)]
    completions = [ok("72"), "junk", ok("100"), ok("1")]
    total, parts = rewards([p.prompt for p in problems], completions, **reward_columns(problems, [False] * 4))
    assert parts["gold_length"] == [2.5, 2.5, 3.0, 3.0]  # len("72") + 0.5 for gsm8k rows, len("100")
    assert total == pytest.approx([0.1 + 5.0, 5.0, 0.1 + 6.0, 0.1 + 6.0])
    assert rewards.describe() == "0.1*format + 2*gold_length"
    # an absolute path works from anywhere; a relative one resolves against base, else the working directory
    assert Rewards({f"{reward_file}:gold_length": 1.0}).items[0].name == "gold_length"
    with pytest.raises(ConfigError, match="file not found: .*my_rewards.py"):
        Rewards({"my_rewards.py:gold_length": 1.0})


def test_none_means_not_applicable(reward_file):
    rewards = Rewards({"format": 1.0, f"{reward_file}:odd_only": 10.0})
    total, parts = rewards(["q"] * 3, [ok("1"), ok("2"), "junk"], a=[1, 2, 3])
    assert total == [11.0, 1.0, 10.0]  # None adds nothing
    assert parts["odd_only"][0] == 1.0 and math.isnan(parts["odd_only"][1]) and parts["odd_only"][2] == 1.0


def test_reward_file_load_errors_name_the_file_and_function(reward_file, tmp_path):
    base = reward_file.parent
    with pytest.raises(ConfigError, match=r"reward 'nowhere.py:f': file not found: .*rewards_dir.nowhere.py"):
        Rewards({"nowhere.py:f": 1.0}, base=base)
    with pytest.raises(ConfigError, match=r"my_rewards.py has no function 'missing' \(it defines: a_number, "):
        Rewards({"my_rewards.py:missing": 1.0}, base=base)
    with pytest.raises(ConfigError, match="'NOT_A_FUNCTION' in .*my_rewards.py is a int, not a function"):
        Rewards({"my_rewards.py:NOT_A_FUNCTION": 1.0}, base=base)
    (base / "broken.py").write_text("def f(prompts, completions:\n    pass\n")
    with pytest.raises(ConfigError, match="cannot load .*broken.py: SyntaxError"):
        Rewards({"broken.py:f": 1.0}, base=base)


@pytest.mark.parametrize("fn, match", [
    ("crash_on_b", r"reward 'crash_on_b' \(.*my_rewards.py:crash_on_b\) raised ZeroDivisionError: float division "
                   r"by zero at my_rewards.py:\d+ on row 1 \(prompt 'second prompt'\)"),
    ("batch_only", r"raised RuntimeError: needs one completion at my_rewards.py:\d+ on the batch of 3 completions "
                   r"\(no row raises alone\)"),
    ("nan_second", r"reward 'nan_second' .* returned nan for row 1 \(prompt 'second prompt'\)"),
    ("inf_first", r"returned inf for row 0 \(prompt 'first prompt, which is long enough to be cut short in "
                  r"the me\.\.\.'\)"),
    ("text_value", r"returned '1.0' for row 0 .*must be a finite number or None"),
    ("one_value", r"reward 'one_value' .* returned 1 values for 3 completions"),
    ("a_number", r"returned a float, not a list of one value per completion"),
])
def test_reward_errors_name_the_function_and_the_row(reward_file, fn, match):
    rewards = Rewards({"accuracy": 1.0, f"{reward_file}:{fn}": 1.0})
    prompts = ["first prompt, which is long enough to be cut short in the message", "second prompt", "third"]
    with pytest.raises(RewardError, match=match):
        rewards(prompts, ["a", "b", "c"], problem=[P] * 3)


# ---- recipes, the command line and a GRPO run ---------------------------------------------------
def _write_recipe(folder, policy, rewards: str, **fields):
    values = dict(init_from=str(policy), task="addition3", prompts_per_step=2, group_size=3, max_new_tokens=4,
                  max_steps=2, progress=False, seed=3, mask_truncated=False)
    values.update(fields)
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path = folder / "grpo.toml"
    path.write_text(body + "[rewards]\n" + rewards)
    return path


def test_recipe_reward_files_resolve_against_the_recipe_folder(reward_file, tiny_task_model, tmp_path,
                                                                monkeypatch):
    from nanoseek.train.grpo import load_grpo_recipe
    recipe_file = _write_recipe(reward_file.parent, tiny_task_model, 'accuracy = 1.0\n"my_rewards.py:odd_only" = 0.5\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    r = load_grpo_recipe(recipe_file)
    assert r.rewards == {"accuracy": 1.0, f"{reward_file.resolve()}:odd_only": 0.5}
    assert r.validate().rewards == r.rewards  # validating again (the trainer does) keeps the same file
    # on the command line a relative file is relative to the working directory
    r = load_grpo_recipe(recipe_file, {"rewards": '{"rewards_dir/my_rewards.py:gold_length": 1}'})
    assert r.rewards == {f"{reward_file.resolve()}:gold_length": 1}
    with pytest.raises(ConfigError, match=r"invalid GRPO recipe field 'rewards' in .*grpo.toml: reward "
                                          r"'my_rewards.py:nope': .*has no function 'nope'"):
        load_grpo_recipe(_write_recipe(reward_file.parent, tiny_task_model, '"my_rewards.py:nope" = 1.0\n'))


@pytest.mark.parametrize("rewards, match", [
    ('"missing.py:f" = 1.0\n', r"reward 'missing.py:f': file not found: .*missing.py"),
    ('"no_such_module:f" = 1.0\n', "cannot import module 'no_such_module'"),
    ('"my_rewards.py:missing" = 1.0\n', "has no function 'missing'"),
    ('"my_rewards.py:NOT_A_FUNCTION" = 1.0\n', "is a int, not a function"),
])
def test_cli_refuses_bad_rewards_before_writing_anything(reward_file, tiny_task_model, tmp_path, capsys,
                                                         rewards, match):
    from nanoseek.cli import main
    out = tmp_path / "run"
    recipe = _write_recipe(reward_file.parent, tiny_task_model, rewards, out=str(out))
    assert main(["grpo", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid GRPO recipe field 'rewards'") and err.count("\n") == 1, err
    assert re.search(match, err) and not out.exists()


RECORDING_REWARD = """
import json, pathlib

def operand_parity(prompts, completions, problem, a, b, truncated, **_):
    assert a == [p.data["a"] for p in problem] and len(truncated) == len(completions)
    with open(pathlib.Path(__file__).with_name("calls.jsonl"), "a") as f:
        f.write(json.dumps({"a": a, "b": b}) + "\\n")
    return [float(x % 2) for x in a]

def big_b(prompts, completions, b, **_):
    return [1.0 if x >= 500 else None for x in b]
"""


def test_grpo_logs_a_file_reward_that_reads_a_task_column(tiny_task_model, tmp_path, monkeypatch):
    from nanoseek.train.grpo import grpo, load_grpo_recipe
    folder = tmp_path / "recipe"
    folder.mkdir()
    (folder / "parity.py").write_text(RECORDING_REWARD)
    recipe = _write_recipe(folder, tiny_task_model, 'accuracy = 1.0\n"parity.py:operand_parity" = 1.0\n'
                                                   '"parity.py:big_b" = 0.5\n', out=str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    assert grpo(load_grpo_recipe(recipe))["step"] == 2
    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and len(logged) == 2
    for call, row in zip(calls, logged):
        a, b = call["a"], call["b"]
        assert len(a) == 6 and a[0] == a[1] == a[2] and a[3] == a[4] == a[5]  # 2 prompts x 3 samples
        assert row["reward_operand_parity"] == pytest.approx(sum(x % 2 for x in a) / 6)
        big = [x for x in b if x >= 500]
        assert row.get("reward_big_b") == (1.0 if big else None)  # None rows are left out of the mean
        assert row["reward_mean"] == pytest.approx(row["reward_accuracy"] + row["reward_operand_parity"] +
                                                   0.5 * len(big) / 6, abs=1e-6)
    assert any("reward_big_b" in row for row in logged)


def test_format_reward_reads_replies_as_the_problems_task_does(tmp_path):
    """A dataset task whose reply format takes a single \\boxed{} gives such a reply its format reward;
    the built-in tasks (strict <answer> tags) still give it none."""
    from nanoseek.tasks import load_dataset
    path = tmp_path / "boxed.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(12)), encoding="utf-8")
    task = load_dataset(path, reply_format="either", test_fraction=0.5)
    problem = task.generate(1, split="train")[0]
    boxed = f"adding\n</think>\n\nSo the answer is \\boxed{{{problem.answer}}}."
    tagged = f"adding\n</think>\n\n<answer>{problem.answer}</answer>"
    assert format_reward(["q", "q"], [boxed, tagged], problem=[problem, problem]) == [1.0, 1.0]
    assert format_reward(["q", "q"], [boxed, tagged]) == [0.0, 1.0]
    builtin = get_task("addition3").generate(1)[0]
    assert format_reward(["q"], [boxed], problem=[builtin]) == [0.0]
