"""Reasoning tasks with exact checkers: generators (seed + difficulty), disjoint train/test splits,
step-by-step solver traces (cold-start SFT data) and rule-based rewards.

    from nanoseek.tasks import get_task, Rewards
    task = get_task("addition3")
    train = task.generate(10_000, seed=0, split="train")      # Problems; test split is disjoint
    task.messages(train[0])      # [user, assistant{reasoning_content: trace, content: <answer>..}]
    task.check(completion_text, train[0])                      # strict: <answer> after </think>
    rewards = Rewards({"accuracy": 1.0, "format": 0.1})        # (prompts, completions, **cols) -> floats

Tasks: addition (3-6 digits, carry-heavy) and addition3..addition6; multiplication (2x2 and 3x2) and
multiplication2x2, multiplication3x2; countdown (3-4 numbers) and countdown3, countdown4; and any local
file of problems: `load_dataset("gsm8k.jsonl", verifier="math")` (dataset.py, verifiers in verify.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import prepare
from ..data.sources import training_texts
from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer
from .arithmetic import Addition, Multiplication, addition_trace, multiplication_trace
from .base import (ANSWER_CLOSE, ANSWER_OPEN, Problem, Task, default_max_new_tokens, extract_answer, format_reply,
                   parse_integer, prompt_ids, split_of, split_reply, strip_eos)
from .countdown import Countdown, ExpressionError, check_expression, evaluate, solve_countdown
from .registry import TASKS, get_task, register
from .dataset import DatasetTask, export_task, extract_gold, load_dataset, read_rows
from .rewards import Rewards, accuracy_reward, format_reward, resolve_reward, think_reward
from .verify import VERIFIERS, Verifier, get_verifier


def write_chat_jsonl(task: Task | str, path: str | Path, n: int, seed: int = 0, split: str = "train",
                     difficulty: int | None = None) -> Path:
    """n solver-trace conversations as chat JSONL ({"messages": [user, assistant]} per line), the
    cold-start SFT data `nanoseek data prepare --format chat` reads. A dataset task writes its traces
    (all of the split when it holds fewer than n)."""
    task = get_task(task)
    lines = [json.dumps({"messages": task.messages(problem)}, ensure_ascii=False) + "\n"
             for problem in task.generate(n, seed=seed, split=split, difficulty=difficulty)]  # errors: no file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def prepare_cold_start(task: Task | str, out: str | Path, n: int, seed: int = 0, difficulty: int | None = None,
                       vocab_size: int | None = None, progress: bool = False) -> dict:
    """Everything cold-start SFT needs, in folder `out`: cold_start.jsonl (n solver traces), tokenizer/
    and data/ (token shards with loss masks on the replies). The default tokenizer is byte-level (the
    7 special tokens + 256 bytes, no merges), so every digit is its own token, which small models
    need to learn arithmetic; a larger `vocab_size` learns BPE merges from the traces.
    Returns {"jsonl", "tokenizer", "data"} paths."""
    out = Path(out)
    jsonl = write_chat_jsonl(task, out / "cold_start.jsonl", n, seed=seed, difficulty=difficulty)
    tok = Tokenizer.train(training_texts([jsonl], "chat"), vocab_size or MIN_VOCAB_SIZE)
    tok.save(out / "tokenizer")
    prepare(tok, [jsonl], out / "data", fmt="chat", overwrite=True, progress=progress)
    return {"jsonl": jsonl, "tokenizer": out / "tokenizer", "data": out / "data"}


__all__ = ["Task", "Problem", "TASKS", "get_task", "register", "Addition", "Multiplication", "Countdown", "Rewards",
           "accuracy_reward", "format_reward", "think_reward", "resolve_reward", "extract_answer", "split_reply",
           "strip_eos", "format_reply", "parse_integer", "split_of", "addition_trace", "multiplication_trace",
           "solve_countdown", "check_expression", "evaluate", "ExpressionError", "write_chat_jsonl",
           "prepare_cold_start", "prompt_ids", "default_max_new_tokens", "ANSWER_OPEN", "ANSWER_CLOSE",
           "DatasetTask", "load_dataset", "export_task", "extract_gold", "read_rows", "VERIFIERS", "Verifier",
           "get_verifier"]
