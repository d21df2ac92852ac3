"""Task evaluation: interval and pass@k statistics, majority vote, greedy/sampled metrics with a scripted
model, reports, and `nanoseek eval` end to end on a tiny model."""

import json
import math

import sys

import pytest

from nanoseek.eval import (evaluate_model, evaluate_task, majority_correct, markdown_table, mean_interval, pass_at_k,
                           wilson_interval, write_eval)
from nanoseek.tasks import get_task
from nanoseek.tokenizer import Tokenizer

TASK = get_task("addition3")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_task_model):
    return tiny_task_model


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0.1 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mean_interval():
    lo, hi = mean_interval([0.0, 1.0] * 50)
    half = 1.959963984540054 * math.sqrt(0.25 * 100 / 99 / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert mean_interval([1.0] * 10) == (1.0, 1.0)


def test_pass_at_k():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def reply(answer: str) -> str:
    return f"x\n</think>\n\n<answer>{answer}</answer>"


def test_majority_vote():
    p = TASK.problem(347, 589)
    assert majority_correct(TASK, p, [reply("936"), reply("935"), reply("936"), "junk"])
    assert not majority_correct(TASK, p, [reply("935"), reply("935"), reply("936")])
    assert majority_correct(TASK, p, [reply("936"), reply("935")])  # tie: first seen
    assert not majority_correct(TASK, p, ["junk", "junk"])
    cd = get_task("countdown4")
    q = cd.problem([25, 5, 4, 3], 83)
    # different expressions with the target's value are one answer
    assert majority_correct(cd, q, [reply("(25-5)*4+3"), reply("3+4*(25-5)"), reply("25*4-5-3"), reply("25*4-5-3")])


def test_evaluate_task_with_a_scripted_model(model_dir, monkeypatch):
    """The 'model' answers correctly in greedy mode; sampled, it is right in 1 of every 4 samples."""
    tok = Tokenizer.load(model_dir)
    problems = TASK.generate(10, seed=0, split="test")
    by_prompt = {p.prompt: p for p in problems}
    calls = []

    def fake_generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                      eos_token_id=None):
        calls.append((temperature, top_p, len(prompts)))
        out = []
        for j, ids in enumerate(prompts):
            p = by_prompt[tok.decode(ids).split("<｜User｜>")[1].split("<｜Assistant｜>")[0]]
            good = temperature == 0 or j % 4 == 0
            out.append(tok.encode(TASK.completion(p) if good else reply("1")) + [tok.eos_id])
        return out

    # generate_batches calls the module's generate (the package attribute of that name is the function)
    monkeypatch.setattr(sys.modules["nanoseek.infer.generate"], "generate", fake_generate)
    res = evaluate_task(None, tok, TASK, problems=problems, k=4, batch_size=8)
    assert res["greedy_accuracy"]["value"] == 1.0 and res["format_rate"] == 1.0 and res["truncated_rate"] == 0.0
    assert res["pass@1"]["value"] == pytest.approx(0.25) and res["pass@4"]["value"] == 1.0
    assert res["maj@4"]["value"] == 0.0  # three wrong votes for "1" beat one right answer
    assert calls[0] == (0.0, 1.0, 8) and calls[-1][:2] == (0.6, 0.95)
    assert sum(c[2] for c in calls) == 10 + 40
    table = markdown_table([res], ["scripted"])
    assert "| scripted | addition3 | 10 | 100.0% [" in table


def test_eval_random_model_and_cli(model_dir, tmp_path, capsys):
    res = evaluate_model(model_dir, "addition3", out=tmp_path / "r", n=4, k=2, max_new_tokens=8)
    assert res["n"] == 4 and res["greedy_accuracy"]["value"] == 0.0 and res["truncated_rate"] == 1.0
    saved = json.loads((tmp_path / "r" / "eval-addition3.json").read_text())
    assert saved["pass@2"]["ci95"][1] > 0 and (tmp_path / "r" / "eval-addition3.md").exists()
    from nanoseek.cli import main
    assert main(["eval", str(model_dir), "--task", "countdown3", "--n", "3", "--k", "2", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "countdown3 (n=3)" in out and "pass@2" in out
    assert (tmp_path / "cli" / "eval-countdown3.json").exists()
    assert main(["eval", str(tmp_path), "--task", "addition3", "--n", "2"]) == 2
    assert main(["eval", str(model_dir), "--task", "nope", "--n", "2"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_write_eval_examples(tmp_path):
    res = {"task": "addition3", "n": 1, "k": 0, "temperature": 0.6, "format_rate": 1.0,
           "greedy_accuracy": {"value": 1.0, "ci95": [0.2, 1.0]}, "mean_completion_tokens": 10,
           "examples": [{"prompt": "q", "completion": "c", "correct": True}]}
    _, md = write_eval(res, tmp_path, "m")
    assert "**q** (correct)" in md.read_text()


@pytest.mark.parametrize("option, value, field", [
    ("--temperature", "nan", "temperature"), ("--temperature", "-1", "temperature"),
    ("--temperature", "inf", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "nan", "top_p"),
    ("--top-p", "1.5", "top_p"), ("--batch-size", "0", "batch_size"), ("--batch-size", "-1", "batch_size"),
    ("--max-new-tokens", "0", "max_new_tokens"), ("--max-new-tokens", "-2", "max_new_tokens"),
    ("--threads", "-1", "threads")])
def test_eval_bad_numbers_are_one_line_errors(model_dir, capsys, option, value, field):
    """Each bad setting is `error: <field> ...`, exit 2, before the model is even loaded."""
    from nanoseek.cli import main
    assert main(["eval", str(model_dir), "--task", "addition3", "--n", "4", "--k", "2", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {field} ") and "\n" not in err and value.lstrip("-") in err


def test_evaluate_task_checks_its_settings_too(model_dir):
    from nanoseek import ConfigError
    from nanoseek.checkpoint import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(model_dir)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_task(model, tok, "addition3", n=2, k=1, batch_size=0, max_new_tokens=2)
