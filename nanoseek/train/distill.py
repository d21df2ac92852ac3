"""Distillation (DeepSeek-R1 Sec. 2.3.3 / 2.4): sample reasoning traces from a teacher, keep only the
correct ones (rejection sampling with the task's strict checker), write them as chat JSONL, and SFT a
student on them with the ordinary trainer.

    out/traces.jsonl   {"messages": [user, assistant{reasoning_content, content}]} per kept trace
    out/distill.json   how many problems, samples, kept traces, acceptance rate, wall time
    out/data/          the traces tokenized for the student (nanoseek.data.prepare)
    out/student/       the student's training run (model/ is the distilled model)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import load_model_and_tokenizer, resolve_model_dir
from ..data import prepare
from ..errors import DataError
from ..infer import check_generation, generate_batches
from ..tasks import Task, default_max_new_tokens, get_task, prompt_ids, split_reply, strip_eos
from ..tokenizer import Tokenizer
from .recipe import TrainRecipe
from .trainer import train


def completion_to_message(completion: str, task: Task) -> dict | None:
    """The assistant message of a completion (text after `<think>\\n`) well-formed for `task` (its
    reply format: a dataset may accept a boxed answer), or None."""
    if task.extract(completion) is None:
        return None
    reasoning, tail = split_reply(completion)
    if reasoning.endswith("\n"):  # the chat template writes reasoning + "\n</think>"
        reasoning = reasoning[:-1]
    return {"role": "assistant", "reasoning_content": reasoning, "content": strip_eos(tail).strip()}


def sample_traces(teacher: str | Path, task: Task | str, n_problems: int, *, samples_per_problem: int = 4,
                  keep_per_problem: int = 1, temperature: float = 0.6, top_p: float = 0.95,
                  max_new_tokens: int | None = None, batch_size: int = 128, seed: int = 0,
                  difficulty: int | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Rejection sampling: `samples_per_problem` teacher samples for each of `n_problems` train-split
    problems; keeps up to `keep_per_problem` distinct correct traces per problem. `task`: a name or a
    Task (a DatasetTask samples its train split; fewer problems than asked: all of them). Returns
    (chat records, statistics)."""
    if samples_per_problem < 1 or keep_per_problem < 1 or n_problems < 1:
        raise DataError("n_problems, samples_per_problem and keep_per_problem must be at least 1")
    check_generation(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)
    task = get_task(task)
    model, tok = load_model_and_tokenizer(teacher)
    problems = task.generate(n_problems, seed=seed, split="train", difficulty=difficulty)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(task, tok, problems)
    rows = [ids for ids in prompt_ids(tok, problems) for _ in range(samples_per_problem)]
    t0 = time.perf_counter()
    with tqdm(total=len(rows), desc="distill: sample", unit="seq", disable=not progress, leave=False) as bar:
        outs = generate_batches(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, eos_id=tok.eos_id, batch_size=batch_size, on_batch=bar.update)
    records, correct, solved = [], 0, 0
    for i, problem in enumerate(problems):
        kept, seen = 0, set()
        for ids in outs[i * samples_per_problem:(i + 1) * samples_per_problem]:
            text = tok.decode(ids)
            if not task.check(text, problem):
                continue
            correct += 1
            message = completion_to_message(text, task)
            key = (message["reasoning_content"], message["content"])
            if kept < keep_per_problem and key not in seen:
                seen.add(key)
                kept += 1
                records.append({"messages": problem.chat() + [message]})
        solved += kept > 0
    total = len(rows)
    stats = {"teacher": str(teacher), "task": task.name, "problems": len(problems),
             "samples_per_problem": samples_per_problem, "temperature": temperature, "top_p": top_p,
             "max_new_tokens": max_new_tokens, "samples": total, "correct_samples": correct,
             "acceptance_rate": correct / total, "problems_solved": solved, "kept_traces": len(records),
             "generated_tokens": sum(map(len, outs)), "sample_seconds": time.perf_counter() - t0}
    return records, stats


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def distill(teacher: str | Path, task: Task | str, out: str | Path, *, n_problems: int = 1000,
            samples_per_problem: int = 4, keep_per_problem: int = 1, temperature: float = 0.6, top_p: float = 0.95,
            max_new_tokens: int | None = None, batch_size: int = 128, seed: int = 0, difficulty: int | None = None,
            student: dict | None = None, train_student: bool = True, progress: bool = True) -> dict:
    """Sample, filter and write the traces under `out`; then (train_student) SFT a student on them.

    `student`: TrainRecipe fields for the student run (preset / config / init_from, model overrides,
    max_steps, lr, batch_size, seq_len, ...); `out`, `data`, `mode` and `tokenizer` are set here. The
    student shares the teacher's tokenizer (the traces are tokenized with it). Returns a summary."""
    out = Path(out)
    records, stats = sample_traces(teacher, task, n_problems, samples_per_problem=samples_per_problem,
                                   keep_per_problem=keep_per_problem, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                   difficulty=difficulty, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    traces = write_jsonl(records, out / "traces.jsonl")
    stats["traces"] = str(traces)
    (out / "distill.json").write_text(json.dumps(stats, indent=2))
    if not train_student:
        return stats
    if not records:
        raise DataError(f"the teacher {teacher} solved none of the {n_problems} problems: nothing to distill")
    tok_dir = resolve_model_dir(teacher)
    tok = Tokenizer.load(tok_dir)
    prepare(tok, [traces], out / "data", fmt="chat", overwrite=True, progress=progress)
    fields = {"preset": "tiny", "max_steps": 200, "batch_size": 16, "seq_len": 256, "eval_every": 0}
    fields.update(student or {})
    if any(fields.get(k) for k in ("config", "init_from")):
        fields.pop("preset", None)
    fields.update(out=str(out / "student"), data=str(out / "data"), mode="sft", tokenizer=str(tok_dir),
                  progress=progress)
    summary = train(TrainRecipe(**fields).validate())
    stats["student"] = summary
    (out / "distill.json").write_text(json.dumps(stats, indent=2))
    return stats
