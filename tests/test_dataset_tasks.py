"""Dataset tasks (nanoseek/tasks/dataset.py): four file formats, field mapping, GSM8K / MATH gold
extraction, splits, templates, traces; bad input as one-line errors that write nothing; a built-in
task and its export give the same prompts, rewards and accuracy; eval, grpo, distill and tasks
write/export on a dataset; the worked example of docs/reasoning.md on a tiny model."""

import json
import sys
import warnings

import pytest

from nanoseek.cli import main
from nanoseek.errors import ConfigError, DataError
from nanoseek.eval import evaluate_task
from nanoseek.tasks import (TASKS, DatasetTask, Rewards, export_task, extract_gold, get_task, load_dataset,
                            prompt_ids)
from nanoseek.tasks.base import split_of
from nanoseek.tasks.dataset import EXPORT_OPTIONS
from nanoseek.tokenizer import Tokenizer

from conftest import TINY_TASK_MODEL as TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GSM = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                    "May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72"},
       {"question": "A shop sells 1,000 pens and 234 pencils. How many items is that?",
        "answer": "1000 + 234 = <<1000+234=1234>>1234 items.\n#### 1,234"},
       {"question": "What is 7 times 6?", "answer": "7 * 6 = 42.\n#### 42"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def gsm8k_like(n: int, seed: int = 0) -> list[dict]:
    """n distinct GSM8K-format word problems (addition and subtraction of two-digit numbers)."""
    import random
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        name, a, b = rng.choice(["Ava", "Ben", "Cleo"]), rng.randint(10, 99), rng.randint(10, 99)
        q = f"{name} has {a} apples and buys {b} more. How many apples does {name} have now?"
        if q not in seen:
            seen.add(q)
            rows.append({"question": q, "answer": f"{a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return rows


# ---- reading -----------------------------------------------------------------------------------
def test_four_formats_give_the_same_problems(tmp_path):
    import csv
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [dict(row, split="test" if i == 2 else "train") for i, row in enumerate(GSM)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "split"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    (tmp_path / "f.csv").write_text((tmp_path / "d.csv").read_text(encoding="utf-8"), encoding="utf-8-sig")  # BOM
    (tmp_path / "g.jsonl").write_text((tmp_path / "a.jsonl").read_text(encoding="utf-8"), encoding="utf-8-sig")
    seen = []
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.parquet", "f.csv", "g.jsonl"):
        task = load_dataset(tmp_path / name)
        assert [p.answer for p in task.problems["train"]] == ["72", "1234"] and task.problems["test"][0].answer == "42"
        assert task.problems["train"][0].data == rows[0]  # the row's columns, as they are in the file
        seen.append([(p.prompt, p.answer, p.key) for s in ("train", "test") for p in task.problems[s]])
    assert all(s == seen[0] for s in seen)


def test_gold_extraction():
    assert extract_gold(GSM[0]["answer"]) == ("72", "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = "
                                                    "72 clips altogether in April and May.")
    assert extract_gold("#### 1,234")[0] == "1234" and extract_gold("#### 1,234")[1] is None
    solution = "So $x = \\frac{1}{2}$, first \\boxed{3}, then $\\boxed{\\frac{1}{\\sqrt{2}}}$."
    assert extract_gold(solution) == ("\\frac{1}{\\sqrt{2}}", solution)  # the last box, nested braces
    assert extract_gold("\\boxed{5}") == ("5", None) and extract_gold(" 72 ") == ("72", None)


def test_field_mapping_defaults_and_overrides(tmp_path):
    math = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Compute $\\frac{2}{4}$.", "solution": "Halve: $\\boxed{\\frac{1}{2}}$.", "system": "Be brief."}])
    task = load_dataset(math, test_fraction=0.0)
    p = task.problems["train"][0]
    assert p.answer == "\\frac{1}{2}" and p.system == "Be brief." and task.solve(p).startswith("Halve")
    assert task.check(task.completion(p), p) and task.check("x\n</think>\n\n<answer>0.5</answer>", p)
    tok = Tokenizer.train(["x"], vocab_size=263)
    assert "Be brief." in tok.decode(prompt_ids(tok, [p])[0])  # the system prompt goes before the user's
    assert task.messages(p)[0] == {"role": "system", "content": "Be brief."}
    own = write_jsonl(tmp_path / "own.jsonl", [{"q": "Capital of France?", "a": "Paris", "why": "It is Paris."}])
    task = load_dataset(own, prompt_field="q", answer_field="a", trace_field="why", verifier="exact",
                        template="plain", test_fraction=0.0)
    p = task.problems["train"][0]
    assert (p.prompt, p.answer, task.solve(p)) == ("Capital of France?", "Paris", "It is Paris.")
    assert get_task(p.task) is task and TASKS[task.name] is task  # registered: rewards find it


def test_splits_from_a_column_a_second_file_or_a_hash(tmp_path):
    rows = gsm8k_like(200)
    by_hash = load_dataset(write_jsonl(tmp_path / "h.jsonl", rows))
    assert all(split_of("dataset", p.key, 0.1) == s for s in ("train", "test") for p in by_hash.problems[s])
    assert 5 <= len(by_hash.problems["test"]) <= 40 and sum(map(len, by_hash.problems.values())) == 200
    all_test = load_dataset(tmp_path / "h.jsonl", test_fraction=1.0)
    assert len(all_test.problems["test"]) == 200 and not all_test.problems["train"]
    column = write_jsonl(tmp_path / "c.jsonl", [dict(r, part="test" if i < 3 else "train") for i, r in enumerate(rows)])
    task = load_dataset(column, split_field="part")
    assert [p.key for p in task.problems["test"]] == [" ".join(r["question"].split()) for r in rows[:3]]
    train, test = write_jsonl(tmp_path / "train.jsonl", rows[:50]), write_jsonl(tmp_path / "test.jsonl", rows[49:60])
    with pytest.warns(UserWarning, match="1 question.* in both the train and the test split"):
        task = load_dataset(train, test_file=test)
    assert len(task.problems["train"]) == 50 and len(task.problems["test"]) == 11
    assert task.report()["in_both_splits"] == 1


def test_templates(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "Q?", "answer": "B", "topic": "logic"}])
    assert load_dataset(path, test_fraction=0).problems["train"][0].prompt == \
        "Q?\n\nThink it through, then write the final answer inside <answer></answer>."
    assert "only the letter of the correct choice" in \
        load_dataset(path, verifier="choice", test_fraction=0).problems["train"][0].prompt
    custom = load_dataset(path, template="[{topic}] {question} {unknown}", test_fraction=0)
    assert custom.problems["train"][0].prompt == "[logic] Q? {unknown}"
    assert load_dataset(path, template="plain", test_fraction=0).problems["train"][0].prompt == "Q?"
    with pytest.raises(ConfigError, match="must contain {question}"):
        load_dataset(path, template="Answer it.")


def test_generate_sample_and_traces(tmp_path):
    task = load_dataset(write_jsonl(tmp_path / "g.jsonl", gsm8k_like(30)), test_fraction=0.0)
    a = task.generate(10, seed=3)
    assert a == task.generate(10, seed=3) and a != task.generate(10, seed=4)
    order = [p.key for p in task.problems["train"]]
    assert [order.index(p.key) for p in a] == sorted(order.index(p.key) for p in a)  # file order
    with pytest.warns(UserWarning, match="asked for 50 train problems, the file has 30"):
        assert len(task.generate(50)) == 30
    import random
    assert task.sample(random.Random(0)) in task.problems["train"]
    with pytest.raises(DataError, match="no difficulty levels"):
        task.generate(1, difficulty=3)
    with pytest.raises(DataError, match="no test problems"):
        task.generate(1, split="test")
    assert task.has_traces() and all(task.check(task.completion(p), p) for p in task.problems["train"])
    bare = load_dataset(write_jsonl(tmp_path / "bare.jsonl", [{"question": "1+1?", "answer": "2"}]), test_fraction=0)
    assert not bare.has_traces()
    with pytest.raises(DataError, match=r"bare.jsonl:1: no reasoning trace"):
        bare.messages(bare.problems["train"][0])


# ---- bad input ---------------------------------------------------------------------------------
BAD = {
    "missing field": ('{"question": "a", "answer": "1"}\n{"prompt": "b", "label": "2"}\n',
                      r"bad.jsonl:2: no field 'question' \(the row has prompt, label\)"),
    "empty prompt": ('{"question": "  ", "answer": "1"}\n', r"bad.jsonl:1: empty prompt in field 'question'"),
    "duplicate": ('{"question": "a", "answer": "1"}\n{"question": "x", "answer": "1"}\n'
                  '{"question": "a", "answer": "2"}\n',
                  r"bad.jsonl:3: duplicate question \(also at .*bad.jsonl:1\)"),
    "non-UTF-8": (b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n',
                  r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9 at offset \d+\)"),
    "invalid JSON": ('{"question": "a", "answer": "1"}\n{"question": \n', r"bad.jsonl:2: invalid JSON"),
    "bad split": ('{"question": "a", "answer": "1", "split": "dev"}\n', r"bad.jsonl:1: field 'split' is 'dev'"),
    "no answer field": ('{"question": "a", "label": "1"}\n', r"no answer field \(looked for answer, solution"),
}


@pytest.fixture(scope="module")
def model_dir(tiny_task_model):
    return tiny_task_model


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_are_one_line_errors_that_write_nothing(case, model_dir, tmp_path, capsys):
    content, needle = BAD[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=needle):
        DatasetTask(bad)
    for argv in (["eval", str(model_dir), "--dataset", str(bad), "--out", str(tmp_path / "out")],
                 ["tasks", "write", "--dataset", str(bad), "--n", "2", "--out", str(tmp_path / "out" / "c.jsonl")],
                 ["grpo", "--init-from", str(model_dir), "--dataset", str(bad), "--out", str(tmp_path / "out")],
                 ["distill", "--teacher", str(model_dir), "--dataset", str(bad), "--out", str(tmp_path / "out")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "bad.jsonl" in err[-1], (argv, err)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "{missing}"], "dataset file not found: .*missing.jsonl"),
    (["--dataset", "{good}", "--verifier", "sympy"], "unknown verifier 'sympy'"),
    (["--dataset", "{good}", "--reply-format", "xml"], "unknown reply_format 'xml'"),
    (["--dataset", "{good}", "--tolerance", "nan", "--verifier", "numeric"], "tolerance"),
    (["--dataset", "{good}", "--test-fraction", "2"], "test_fraction must be in"),
    (["--dataset", "{txt}"], "unknown dataset format '.txt'"),
    (["--task", "addition3", "--verifier", "exact"], "--verifier is a dataset option"),
    (["--task", "addition3", "--dataset", "{good}"], "not allowed with argument"),
])
def test_bad_options_are_one_line_errors(argv, needle, model_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", GSM)
    (tmp_path / "x.txt").write_text("q")
    paths = {"missing": tmp_path / "missing.jsonl", "good": good, "txt": tmp_path / "x.txt"}
    argv = [a.format(**paths) for a in argv]
    try:
        code = main(["eval", str(model_dir), *argv, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    import re
    assert re.search(needle, err[-1]), err
    assert not (tmp_path / "out").exists()


def test_grpo_recipe_takes_a_dataset_and_validates_it_before_any_folder(model_dir, tmp_path):
    from nanoseek.train.grpo import load_grpo_recipe
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_like(40))
    recipe = tmp_path / "g.toml"
    recipe.write_text(f'init_from = "{model_dir}"\ndataset = "{data}"\nverifier = "math"\nmax_steps = 1\n')
    r = load_grpo_recipe(recipe)
    assert r.task == "" and isinstance(r.build_task(), DatasetTask)
    assert load_grpo_recipe(None, {"init_from": str(model_dir)}).task == "addition3"  # the default stays
    with pytest.raises(ConfigError, match="'dataset'.*either task .*or dataset"):
        load_grpo_recipe(recipe, {"task": "addition3"})
    with pytest.raises(ConfigError, match="'difficulty'.*no difficulty"):
        load_grpo_recipe(recipe, {"difficulty": "3"})
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(20)])
    with pytest.raises(ConfigError, match="'max_new_tokens'.*no reasoning trace"):
        load_grpo_recipe(None, {"init_from": str(model_dir), "dataset": str(bare)})
    with pytest.raises(ConfigError, match="unknown verifier"):
        load_grpo_recipe(recipe, {"verifier": "nope"})


# ---- a built-in task and its export ------------------------------------------------------------
def adversarial_replies(task, p) -> list[str]:
    """Right, wrong and malformed completions of a built-in arithmetic problem."""
    right = task.completion(p)
    wrong = right.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
    return [right, wrong, right.replace(p.answer + "<", "0" + p.answer + "<"), right + " extra",
            right.replace("<answer>", "<answer>\\boxed{").replace("</answer>", "}</answer>"),
            right.split("</think>")[0] + "</think>\n\n\\boxed{" + p.answer + "}", "junk", right.replace("</think>", ""),
            right.replace(f"<answer>{p.answer}", f"<answer>{p.answer}.0"), right + "<｜end▁of▁sentence｜>"]


@pytest.mark.parametrize("name", ["addition3", "multiplication2x2"])
def test_export_gives_the_same_prompts_rewards_and_accuracy(name, tmp_path, model_dir, monkeypatch):
    builtin = get_task(name)
    problems = builtin.generate(40, seed=1234, split="test")
    assert main(["tasks", "export", name, "--n", "40", "--out", str(tmp_path / "x.jsonl")]) == 0
    options = dict(zip(*[iter(a.lstrip("-").replace("-", "_") for a in EXPORT_OPTIONS.split())] * 2))
    data = load_dataset(tmp_path / "x.jsonl", **options)
    mine = data.generate(40, seed=1234, split="test")
    assert [p.prompt for p in mine] == [p.prompt for p in problems]
    assert [p.answer for p in mine] == [p.answer for p in problems]
    rewards = Rewards({"accuracy": 1.0, "format": 0.1})
    replies = [c for p in problems for c in adversarial_replies(builtin, p)]
    ours = rewards([p.prompt for p in mine for _ in range(10)], replies, problem=[p for p in mine for _ in range(10)])
    theirs = rewards([p.prompt for p in problems for _ in range(10)], replies,
                     problem=[p for p in problems for _ in range(10)])
    assert ours == theirs and 0 < sum(ours[1]["accuracy"]) < len(replies)
    # the same accuracy from a scripted model (right greedy, one sample in four right)
    tok = Tokenizer.load(model_dir)
    by_prompt = {p.prompt: p for p in problems}

    def fake_generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                      eos_token_id=None):
        out = []
        for j, ids in enumerate(prompts):
            p = by_prompt[tok.decode(ids).split("<｜User｜>")[1].split("<｜Assistant｜>")[0]]
            replies = adversarial_replies(builtin, p)
            out.append(tok.encode(replies[0] if temperature == 0 else replies[(j * 7 + len(p.prompt)) % 10]))
        return out
    monkeypatch.setattr(sys.modules["nanoseek.infer.generate"], "generate", fake_generate)
    keys = ("greedy_accuracy", "pass@1", "pass@4", "maj@4", "format_rate", "per_problem_correct_samples")
    a = evaluate_task(None, tok, builtin, problems=problems, k=4, max_new_tokens=64)
    b = evaluate_task(None, tok, data, problems=mine, k=4, max_new_tokens=64)
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys} and 0 < a["pass@1"]["value"] < 1


def test_countdown_export_refuses(tmp_path, capsys):
    assert main(["tasks", "export", "countdown3", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "cannot be exported" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
    with pytest.raises(DataError, match="countdown3 checks answers against the problem"):
        export_task(get_task("countdown3"), tmp_path / "c.jsonl", 2)


# ---- commands ----------------------------------------------------------------------------------
def test_eval_on_a_dataset_writes_every_completion_with_its_verdict(model_dir, tmp_path, capsys):
    rows = GSM + [{"question": "Bad gold", "answer": "#### \\frac{1}{"}]
    data = write_jsonl(tmp_path / "gsm.jsonl", [dict(r, split="test") for r in rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", str(model_dir), "--dataset", str(data), "--n", "10", "--k", "2", "--max-new-tokens", "6",
                     "--out", str(tmp_path / "e"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "gsm" and printed["n"] == 3 and "per_completion" not in printed
    assert printed["dataset"]["unparseable_gold"]["count"] == 1
    saved = json.loads((tmp_path / "e" / "eval-gsm.json").read_text())
    assert saved["dataset"]["unparseable_gold"]["first"][0]["location"].endswith("gsm.jsonl:4")
    records = [json.loads(line) for line in (tmp_path / "e" / "eval-gsm-completions.jsonl").read_text().splitlines()]
    assert len(records) == 3 + 3 * 2 and {r["mode"] for r in records} == {"greedy", "sample"}
    assert records[0]["gold"] == "72" and records[0]["correct"] is False and "completion" in records[0]


def test_distill_on_a_dataset_keeps_verified_traces(model_dir, tmp_path, monkeypatch):
    """A fake teacher answers with a boxed reply (accepted by the dataset's reply format), right in its
    even samples and wrong in its odd ones."""
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_like(12))
    task = load_dataset(data, test_fraction=0.0)
    tok = Tokenizer.load(model_dir)
    by_prompt = {p.prompt: p for p in task.problems["train"]}

    def fake_generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                      eos_token_id=None):
        out = []
        for j, ids in enumerate(prompts):
            p = by_prompt[tok.decode(ids).split("<｜User｜>")[1].split("<｜Assistant｜>")[0]]
            answer = p.answer if j % 2 == 0 else "0"
            out.append(tok.encode(f"adding\n</think>\n\nThe answer is \\boxed{{{answer}}}.") + [tok.eos_id])
        return out
    monkeypatch.setattr(sys.modules["nanoseek.infer.generate"], "generate", fake_generate)
    assert main(["distill", "--teacher", str(model_dir), "--dataset", str(data), "--test-fraction", "0",
                 "--out", str(tmp_path / "d"), "--problems", "6", "--samples", "2", "--no-train"]) == 0
    stats = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert stats["task"] == "gsm" and stats["samples"] == 12 and stats["kept_traces"] == 6
    record = json.loads((tmp_path / "d" / "traces.jsonl").read_text().splitlines()[0])
    user, reply = record["messages"]
    assert by_prompt[user["content"]].answer in reply["content"] and reply["reasoning_content"] == "adding"


def test_worked_example_sft_grpo_eval(tmp_path, capsys):
    """docs/reasoning.md's worked example, tiny: traces from a GSM8K-format file -> tokenizer -> data ->
    SFT -> GRPO on the file -> eval on its test split."""
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_like(60))
    run = tmp_path / "runs"
    assert main(["tasks", "write", "--dataset", str(data), "--n", "1000", "--out", str(run / "cold_start.jsonl")]) == 0
    assert main(["tokenizer", "train", "--input", str(run / "cold_start.jsonl"), "--format", "chat",
                 "--vocab-size", "263", "--out", str(run / "tokenizer")]) == 0
    assert main(["data", "prepare", "--tokenizer", str(run / "tokenizer"), "--input", str(run / "cold_start.jsonl"),
                 "--format", "chat", "--out", str(run / "data")]) == 0
    model = json.dumps({**TINY, "max_position_embeddings": 512})
    assert main(["train", "--data", str(run / "data"), "--tokenizer", str(run / "tokenizer"), "--mode", "sft",
                 "--preset", "tiny", "--model", model, "--out", str(run / "sft"), "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "320", "--save-every", "0", "--eval-every", "0",
                 "--progress", "false"]) == 0
    assert main(["grpo", "--init-from", str(run / "sft" / "model"), "--dataset", str(data), "--out",
                 str(run / "grpo"), "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                 "--max-new-tokens", "8", "--progress", "false"]) == 0
    assert json.loads((run / "grpo" / "recipe.json").read_text())["dataset"] == str(data)
    assert main(["eval", str(run / "grpo"), "--dataset", str(data), "--n", "3", "--k", "2",
                 "--max-new-tokens", "8"]) == 0
    assert "gsm (n=3)" in capsys.readouterr().out
