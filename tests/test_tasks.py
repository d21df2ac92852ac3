"""Reasoning tasks: seeded generators, difficulty, disjoint train/test splits, solver traces that the
strict checkers accept, and the Countdown parser (never eval)."""

import json

import pytest

from nanoseek.errors import DataError
from nanoseek.tasks import (TASKS, ExpressionError, addition_trace, check_expression, evaluate, get_task,
                            multiplication_trace, solve_countdown, write_chat_jsonl)
from nanoseek.tasks.base import split_of
from nanoseek.tokenizer import render_chat


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generator_is_seeded_and_solver_traces_check(name):
    task = get_task(name)
    a = task.generate(40, seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in task.generate(40, seed=3)]
    assert [p.prompt for p in a] != [p.prompt for p in task.generate(40, seed=4)]
    assert len({p.prompt for p in a}) == 40
    for p in a + task.generate(20, seed=3, split="test"):
        assert task.check(task.completion(p), p), p.prompt
        assert p.level in task.levels


@pytest.mark.parametrize("name", ["addition3", "multiplication2x2", "countdown3"])
def test_train_and_test_splits_are_disjoint(name):
    task = get_task(name)
    train = task.generate(600, seed=0, split="train")
    test = task.generate(300, seed=0, split="test")
    assert not {p.key for p in train} & {p.key for p in test}
    assert all(task.split_of(p) == "test" for p in test)
    # the split is a property of the problem, not of the variant that generated it
    p = test[0]
    assert split_of(task.family, p.key, task.test_fraction) == "test"


def test_split_keys_ignore_operand_order():
    add = get_task("addition3")
    assert add.problem(123, 456).key == add.problem(456, 123).key
    assert add.split_of(add.problem(123, 456)) == add.split_of(add.problem(456, 123))


def test_difficulty_levels():
    add = get_task("addition")
    for digits in (3, 4, 5, 6):
        for p in add.generate(10, seed=1, difficulty=digits):
            assert len(str(p.data["a"])) == len(str(p.data["b"])) == digits
    mul = get_task("multiplication")
    assert {len(str(p.data["a"])) for p in mul.generate(20, difficulty=2)} == {3}
    assert all(len(p.data["numbers"]) == 4 for p in get_task("countdown").generate(10, difficulty=4))
    with pytest.raises(DataError, match="difficulty 9"):
        mul.generate(1, difficulty=9)


def test_addition_is_carry_heavy():
    problems = get_task("addition5").generate(300, seed=0)
    carries = [sum(" carry 1" in line for line in get_task("addition5").solve(p).splitlines()) for p in problems]
    assert sum(carries) / (5 * len(problems)) > 0.45  # uniform digits carry ~45% of columns, ours more


def test_small_split_fails_clearly():
    with pytest.raises(DataError, match="only .* distinct test problems"):
        get_task("multiplication2x2").generate(2000, split="test")
    with pytest.raises(DataError, match="unknown split"):
        get_task("addition3").generate(1, split="dev")
    with pytest.raises(DataError, match="unknown task 'subtraction'"):
        get_task("subtraction")


def test_enough_held_out_problems_for_evaluation():
    for name in ("addition3", "multiplication2x2", "countdown3"):
        assert len(get_task(name).generate(1000, seed=1234, split="test")) == 1000


def test_addition_trace():
    lines, total = addition_trace(347, 589)
    assert total == 936
    assert lines == ["7+9=16, carry 1: 6", "4+8+1=13, carry 1: 36", "3+5+1=9, carry 0: 936"]
    lines, total = addition_trace(999, 1)
    assert total == 1000 and lines[-1] == "carry 1: 1000"


def test_multiplication_trace():
    lines, total = multiplication_trace(347, 26)
    assert total == 9022
    assert lines[0] == "347*6:" and "347*6=2082" in lines and "347*20=6940" in lines
    assert lines[-1].endswith(": 9022")
    assert multiplication_trace(47, 30)[1] == 1410


def test_countdown_solver_and_trace():
    expression, steps = solve_countdown([25, 5, 4, 3], 83)
    assert check_expression(expression, [25, 5, 4, 3], 83)
    assert steps[-1].endswith("=83")
    assert solve_countdown([1, 1, 1], 100) is None
    task = get_task("countdown4")
    p = task.problem([25, 5, 4, 3], 83)
    assert task.solve(p).splitlines()[-1] == f"so {task.solution(p)}=83"


def test_countdown_parser():
    assert evaluate("(25-5)*4+3") == (83, [25, 5, 4, 3])
    assert evaluate(" 7 / 2 * 2 ")[0] == 7  # exact fractions
    assert evaluate("8-2-3")[0] == 3 and evaluate("8/2/2")[0] == 2  # left associative
    for bad in ["", "2+", "(2+3", "2+3)", "-2+5", "2**3", "2^3", "__import__('os')", "1e3", "2 3",
                "(" * 20 + "1" + ")" * 20,
                "1/0", "4/(2-2)", "0012", "9" * 7, "1+" * 100 + "1", "２+3"]:
        with pytest.raises(ExpressionError):
            evaluate(bad)
    assert not check_expression("(25-5)*4+3", [25, 5, 4], 83)  # extra number
    assert not check_expression("25*4-5*3", [25, 5, 4, 3], 83)  # wrong value
    assert not check_expression("25+25+25+5+3", [25, 5, 4, 3], 83)  # number used twice
    assert not check_expression("3/(5-5)+25*4", [25, 5, 5, 4, 3], 100)  # division by zero: wrong, no error


def test_messages_render_the_r1_layout(tmp_path):
    task = get_task("addition3")
    p = task.problem(347, 589)
    messages = task.messages(p)
    text = "".join(t for t, _ in render_chat(messages))
    prompt = "".join(t for t, _ in render_chat(messages[:1], add_generation_prompt=True))
    assert text.startswith(prompt)
    assert text[len(prompt):] == task.completion(p) + "<｜end▁of▁sentence｜>"
    path = write_chat_jsonl(task, tmp_path / "sft.jsonl", 5, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["messages"][1]["content"].startswith("<answer>")


def test_problem_roundtrip():
    from nanoseek.tasks import Problem
    p = get_task("countdown3").generate(1)[0]
    assert Problem.from_dict(json.loads(json.dumps(p.as_dict()))) == p


def test_prepare_cold_start(tmp_path):
    from nanoseek.data import TokenLoader
    from nanoseek.tasks import prepare_cold_start
    from nanoseek.tokenizer import Tokenizer
    paths = prepare_cold_start("addition3", tmp_path, 8, seed=0)
    tok = Tokenizer.load(paths["tokenizer"])
    assert tok.vocab_size == 263  # byte level: every digit is one token
    assert [tok.decode([i]) for i in tok.encode("9036")] == list("9036")
    batch = TokenLoader(paths["data"], "train", batch_size=2, seq_len=128, whole_documents=True).next_batch()
    assert batch.target_mask.any() and not batch.target_mask.all()  # the loss is on the replies only
