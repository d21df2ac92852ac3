"""Dataset verifiers (nanoseek/tasks/verify.py) under attack: the adversarial table (reply format,
LaTeX, boxes, units, pathological expressions), the time limit from the main thread and from another
thread, unparseable gold answers, and the small pieces (boxed, numbers, choice letters)."""

import json
import threading
import time
from fractions import Fraction

import pytest

from nanoseek.errors import ConfigError
from nanoseek.tasks import load_dataset
from nanoseek.tasks.verify import (MAX_DEPTH, boxed, choice_letter, get_verifier, parse_number, plain_number, unbox,
                                   worker)


def r(answer: str, reasoning: str = "some reasoning") -> str:
    """A well-formed reply with `answer` in the answer tags."""
    return f"{reasoning}\n</think>\n\n<answer>{answer}</answer>"


def tail(text: str, reasoning: str = "some reasoning") -> str:
    """A reply whose text after </think> is `text`."""
    return f"{reasoning}\n</think>\n\n{text}"


DEEP = "(" * 3000 + "1" + ")" * 3000
NESTED = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)

# (case, verifier, gold answer in the file, completion, verdict); reply_format "either" (the default)
CASES = [
    ("plain integer", "math", "72", r("72"), True),
    ("integer with .0", "math", "72", r("72.0"), True),
    ("wrong integer", "math", "72", r("71"), False),
    ("thousands separator", "math", "1000", r("1,000"), True),
    ("\\frac{1}{2} vs gold 0.5", "math", "0.5", r("\\frac{1}{2}"), True),
    ("0.5 vs gold \\frac{1}{2}", "math", "\\frac{1}{2}", r("0.5"), True),
    ("1/2 vs gold \\frac{1}{2}", "math", "\\frac{1}{2}", r("1/2"), True),
    ("0.3333 vs gold 1/3", "math", "\\frac{1}{3}", r("0.3333"), False),
    ("\\boxed{} inside the answer tags", "math", "0.5", r("\\boxed{\\frac{1}{2}}"), True),
    ("$...$ inside the answer tags", "math", "72", r("$72$"), True),
    ("equivalent expression (x+1)^2", "math", "x^2+2x+1", r("(x+1)^2"), True),
    ("equivalent radical \\sqrt{8}", "math", "2\\sqrt{2}", r("\\sqrt{8}"), True),
    ("units in \\text{} ignored", "math", "5", r("5\\text{ cm}"), True),
    ("units as bare words", "math", "72", r("72 dollars"), False),
    ("boxed reply after </think>", "math", "72", tail("So the answer is \\boxed{72}."), True),
    ("two boxes after </think>", "math", "72", tail("\\boxed{71} or \\boxed{72}"), False),
    ("box only inside the reasoning", "math", "72", tail("no answer", "so \\boxed{72}"), False),
    ("wrong box in reasoning, right tag", "math", "72", r("72", "maybe \\boxed{5}"), True),
    ("right box in reasoning, wrong tag", "math", "72", r("5", "so \\boxed{72}"), False),
    ("answer tag and a box after it", "math", "72", tail("<answer>72</answer> \\boxed{72}"), False),
    ("tag in the reasoning", "math", "72", tail("<answer>72</answer>", "<answer>72</answer>"), False),
    ("no </think>", "math", "72", "<answer>72</answer>", False),
    ("text after </answer>", "math", "72", r("72") + " yes", False),
    ("empty answer", "math", "72", r(""), False),
    ("empty box", "math", "72", tail("\\boxed{}"), False),
    ("unclosed box", "math", "72", tail("\\boxed{72"), False),
    ("10^{10^{10}} (time limit)", "math", "5", r("10^{10^{10}}"), False),
    ("3,000 nested parentheses", "math", "1", r(DEEP), False),
    (f"{MAX_DEPTH + 1} nested parentheses", "math", "1", r(NESTED), False),
    ("infinity", "math", "72", r("\\infty"), False),
    ("exact: same text", "exact", "Paris", r(" Paris "), True),
    ("exact: other case", "exact", "Paris", r("paris"), False),
    ("exact: boxed in tags", "exact", "Paris", r("\\boxed{Paris}"), True),
    ("numeric: within tolerance", "numeric", "72", r("72.00000001"), True),
    ("numeric: outside tolerance", "numeric", "72", r("72.1"), False),
    ("numeric: scientific", "numeric", "72", r("7.2e1"), True),
    ("numeric: separators", "numeric", "1234.5", r("1,234.5"), True),
    ("numeric: fraction", "numeric", "0.75", r("3/4"), True),
    ("numeric: with a unit", "numeric", "72", r("72 apples"), False),
    ("numeric: nan", "numeric", "72", r("nan"), False),
    ("choice: (B)", "choice", "B", r("(B)"), True),
    ("choice: b) text", "choice", "B", r("b) 42 apples"), True),
    ("choice: B. text", "choice", "(B)", r("B. because"), True),
    ("choice: \\boxed{B}", "choice", "B", tail("\\boxed{B}"), True),
    ("choice: other letter", "choice", "B", r("C"), False),
    ("choice: a sentence", "choice", "B", r("I think B"), False),
    ("choice: word starting with A", "choice", "A", r("A cat"), False),
    ("regex: matches", "regex", "7[0-9]", r("72"), True),
    ("regex: does not match", "regex", "7[0-9]", r("82"), False),
    ("regex: partial match", "regex", "7[0-9]", r("725"), False),
    ("regex: catastrophic backtracking (time limit)", "regex", "(a+)+$", r("a" * 40 + "!"), False),
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """One dataset per verifier, a row per case (question = the case's index), time limit 2 s."""
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for name in ("math", "exact", "numeric", "choice", "regex"):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question": f"case {i}", "answer": gold, "split": "test"}) + "\n"
                                for i, (_, v, gold, _, _) in enumerate(CASES) if v == name))
        out[name] = load_dataset(path, verifier=name)
    return out


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_adversarial_table(tasks, i):
    case, verifier, gold, completion, verdict = CASES[i]
    task = tasks[verifier]
    problem = next(p for p in task.problems["test"] if p.key == f"case {i}")
    t0 = time.perf_counter()
    assert task.check(completion, problem) is verdict, case
    assert time.perf_counter() - t0 < 15  # the time limit (2 s) plus a worker restart on a busy machine


def test_time_limit_holds_on_another_thread():
    """math-verify's own timeout (signal.alarm) fails off the main thread; ours is a process deadline."""
    math = get_verifier("math", time_limit=1.0)
    before = worker().timeouts
    results = []

    def run():
        results.append(math.check("9^{9^{9^{9}}}", "3"))
        results.append(math.check("\\frac{2}{4}", "0.5"))  # the worker was replaced and still answers
    thread = threading.Thread(target=run)
    t0 = time.perf_counter()
    thread.start()
    thread.join(60)
    assert results == [False, True] and time.perf_counter() - t0 < 30
    assert worker().timeouts == before + 1


def test_unparseable_gold_answers_are_counted_reported_and_skipped(tmp_path):
    path = tmp_path / "gold.jsonl"
    rows = [{"question": "q1", "answer": "72"}, {"question": "q2", "answer": "\\frac{1}{"},
            {"question": "q3", "answer": "#### "}, {"question": "q4", "answer": "(" * 40 + "1" + ")" * 40}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(UserWarning, match=r"skipped 3 row\(s\).*gold.jsonl:2"):
        task = load_dataset(path, test_fraction=0.0)
    report = task.report()["unparseable_gold"]
    assert report["count"] == 3 and [s["location"] for s in report["first"]] == [f"{path}:{i}" for i in (2, 3, 4)]
    assert [p.answer for p in task.problems["train"]] == ["72"]
    with pytest.warns(UserWarning, match="skipped 1 row"):
        assert len(load_dataset(path, verifier="exact", test_fraction=0.0).problems["train"]) == 3


def test_pieces():
    assert boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == ["\\frac{1}{2}", "3"]
    assert boxed("\\boxed{1") == [] and boxed("x") == []
    assert unbox("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}" and unbox("$\\boxed{3}$") == "3"
    assert unbox("\\boxed{1}+\\boxed{2}") == "\\boxed{1}+\\boxed{2}"
    assert plain_number("-1,234.50") == Fraction(-123450, 100) and plain_number("3/4") == Fraction(3, 4)
    assert plain_number("1e999999999") is None and plain_number("1/0") is None and plain_number("1,23") is None
    assert parse_number("2.5e3") == 2500 and parse_number("1e999") is None and parse_number("x") is None
    letters = [choice_letter(t) for t in ("(b)", "B)", "c: x", "\\text{(D)}", "AB", "")]
    assert letters == ["B", "B", "C", "D", None, None]


def test_unknown_verifier_and_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="unknown verifier 'sympy'; choose one of math, exact"):
        get_verifier("sympy")
    with pytest.raises(ConfigError, match="tolerance"):
        get_verifier("numeric", tolerance=float("nan"))
    with pytest.raises(ConfigError, match="time_limit"):
        get_verifier("math", time_limit=0)


def test_majority_votes_group_equivalent_numbers(tasks):
    from nanoseek.eval import majority_correct
    task = tasks["math"]
    p = next(p for p in task.problems["test"] if p.answer == "72")
    assert majority_correct(task, p, [r("72"), r("72.0"), r("71"), tail("\\boxed{72}")])
    assert not majority_correct(task, p, [r("71"), r("71.00"), r("72")])
