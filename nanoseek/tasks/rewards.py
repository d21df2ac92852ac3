"""Rule-based rewards for GRPO: accuracy (the task's strict checker) plus a small format reward.

A reward is any callable `(prompts, completions, **columns) -> list[float]`, one float per completion.
`prompts` and `completions` are strings (the user message and the generated text after the generation
prompt); `columns` carries per-completion lists such as `problem` (Problem objects), `answer` and
`truncated` (True where generation hit max_new_tokens). Callables should accept and ignore unknown
columns (`**_`). `Rewards` sums weighted callables and keeps each part for logging.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from ..errors import ConfigError
from .base import Problem, extract_answer, parse_integer, split_reply
from .registry import get_task

RewardFn = Callable[..., list[float]]


def accuracy_reward(prompts: Sequence[str], completions: Sequence[str], problem: Sequence[Problem] | None = None,
                    answer: Sequence[str] | None = None, **_) -> list[float]:
    """1.0 when the task's checker accepts the completion, else 0.0. Uses the `problem` column (any
    task) or, without it, compares an `answer` column as an exact integer."""
    if problem is not None:
        return [float(get_task(p.task).check(c, p)) for c, p in zip(completions, problem)]
    if answer is None:
        raise ConfigError("accuracy_reward needs a 'problem' or an 'answer' column")
    out = []
    for c, a in zip(completions, answer):
        got = extract_answer(c)
        out.append(float(got is not None and parse_integer(got) == str(a)))
    return out


def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """1.0 for the R1 layout (reasoning, `</think>`, one non-empty `<answer>` and nothing after),
    whatever the answer says; else 0.0."""
    return [float(extract_answer(c) is not None) for c in completions]


def think_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """1.0 when the think block is closed once and holds some reasoning (a softer format signal)."""
    out = []
    for c in completions:
        parts = split_reply(c)
        out.append(float(parts is not None and bool(parts[0].strip())))
    return out


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "think": think_reward}


def resolve_reward(spec: str | RewardFn) -> RewardFn:
    """A built-in name (accuracy, format, think), `package.module:function`, or a callable."""
    if callable(spec):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ConfigError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN)} or 'module:function'")
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load reward {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward {spec!r} is not callable")
    return fn


class Rewards:
    """A weighted sum of reward callables: `Rewards({"accuracy": 1.0, "format": 0.1})` or
    `Rewards([(name, fn, weight), ...])`. Calling it returns (total per completion, parts by name)."""

    def __init__(self, spec: dict[str, float] | Sequence[tuple[str, RewardFn | str, float]]):
        items = [(name, name, w) for name, w in spec.items()] if isinstance(spec, dict) else list(spec)
        if not items:
            raise ConfigError("at least one reward is required")
        self.items: list[tuple[str, RewardFn, float]] = []
        for name, fn, weight in items:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"reward {name!r} has a non-numeric weight {weight!r}")
            self.items.append((name, resolve_reward(fn), float(weight)))

    def add(self, name: str, fn: RewardFn | str, weight: float = 1.0) -> "Rewards":
        self.items.append((name, resolve_reward(fn), float(weight)))
        return self

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **columns) -> tuple[list[float], dict[str, list[float]]]:
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError("prompts, completions and every column must have one entry per completion")
        total, parts = [0.0] * n, {}
        for name, fn, weight in self.items:
            values = [float(v) for v in fn(prompts, completions, **columns)]
            if len(values) != n:
                raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"reward {name!r} returned a non-finite value")
            parts[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        return total, parts

    def describe(self) -> str:
        return " + ".join(f"{w:g}*{name}" for name, _, w in self.items)
