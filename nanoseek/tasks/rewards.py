"""Rule-based rewards for GRPO: accuracy (the task's strict checker), format, think, and your own.

A reward is any callable `(prompts, completions, **columns) -> list`, one value per completion (TRL's
convention). `prompts` and `completions` are strings (the user message and the generated text after the
generation prompt); `columns` holds one list per column, one entry per completion (G consecutive
completions share a problem, so its values repeat G times):

    problem    the Problem objects            answer     the gold answers (Problem.answer)
    truncated  True where generation hit max_new_tokens
    <key>      every key of Problem.data: a dataset row's columns, a built-in task's fields (a, b;
               numbers, target); None where a problem lacks a key another one has. A key that is one
               of the names above (or prompts / completions) arrives as `data_<key>`, e.g. GSM8K's raw
               `answer` text as `data_answer`.

Callables should accept and ignore columns they do not use (`**_`). A value is a finite number (bool
counts as 0/1) or None for "does not apply to this completion": None adds nothing to the total and is
left out of the reward's logged mean. Anything else (a wrong count, NaN, inf, a string, an exception)
stops the run with a RewardError that names the reward, the function and the row.

A reward is named by a built-in name, `package.module:function` (imported from sys.path) or
`path/to/file.py:function` (a relative path resolves against `base`: the recipe file's folder, or the
working directory). `Rewards` sums the weighted callables and keeps each part, by name, for logging.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from ..errors import ConfigError, NanoseekError
from .base import Problem, extract_answer, parse_integer, split_reply
from .registry import TASKS, get_task

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


def format_reward(prompts: Sequence[str], completions: Sequence[str], problem: Sequence[Problem] | None = None,
                  **_) -> list[float]:
    """1.0 for the R1 layout (reasoning, `</think>`, one non-empty `<answer>` and nothing after),
    whatever the answer says; else 0.0. With a `problem` column the task's own reading decides (a
    dataset task may accept a single `\\boxed{}` reply instead of the answer tags); a problem of no
    registered task is read strictly."""
    if problem is None:
        return [float(extract_answer(c) is not None) for c in completions]
    readers = [TASKS[p.task].extract if p.task in TASKS else extract_answer for p in problem]
    return [float(read(c) is not None) for c, read in zip(completions, readers)]


def think_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """1.0 when the think block is closed once and holds some reasoning (a softer format signal)."""
    out = []
    for c in completions:
        parts = split_reply(c)
        out.append(float(parts is not None and bool(parts[0].strip())))
    return out


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "think": think_reward}
RESERVED_COLUMNS = ("prompts", "completions", "problem", "answer", "truncated")


class RewardError(NanoseekError, ValueError):
    """A reward function failed during a run: names the reward, the function and the row."""


# ---- columns ------------------------------------------------------------------------------------
def reward_columns(problems: Sequence[Problem], truncated: Sequence[bool]) -> dict[str, list]:
    """The keyword columns of a reward call, one entry per completion: problem, answer, truncated and
    every key of the problems' `data` (None where a problem lacks it; a reserved name gets `data_`)."""
    columns: dict[str, list] = {"problem": list(problems), "answer": [p.answer for p in problems],
                                "truncated": list(truncated)}
    keys = list(dict.fromkeys(k for p in problems for k in p.data))  # first-seen order
    names = {key: f"data_{key}" if key in RESERVED_COLUMNS else str(key) for key in keys}
    for key, name in names.items():
        other = [k for k, n in names.items() if n == name and k != key]
        if other:
            raise RewardError(f"dataset columns {key!r} and {other[0]!r} would both be passed to rewards as "
                              f"{name!r} (a column named like a reserved one gets 'data_'); rename one of them")
        columns[name] = [p.data.get(key) for p in problems]
    return columns


# ---- naming and loading rewards ---------------------------------------------------------------
def _split_spec(spec: str) -> tuple[str, str]:
    """'target:function' -> (target, function); the last ':' separates them (a path may hold one)."""
    target, _, name = spec.rpartition(":")
    return target, name


def _is_file(target: str) -> bool:
    return target.endswith(".py")


def reward_name(spec: str) -> str:
    """How a reward is logged (`reward_<name>`): a built-in's name, else the function's name."""
    return spec if spec in BUILTIN or ":" not in spec else _split_spec(spec)[1]


def absolute_reward_paths(rewards: dict[str, Any], base: str | Path | None) -> dict[str, Any]:
    """`rewards` (spec -> weight) with relative `file.py:function` paths made absolute against `base`
    (default the working directory), so the recipe means the same wherever it is run from later."""
    out = {}
    for spec, weight in rewards.items():
        target, name = _split_spec(spec)
        if ":" in spec and _is_file(target) and not Path(target).is_absolute():
            spec = f"{(Path(base or Path.cwd()) / target).resolve()}:{name}"
        out[spec] = weight
    return out


_FILE_MODULES: dict[tuple[str, int, int], Any] = {}  # (path, mtime_ns, size) -> module: each file runs once


def _load_file(spec: str, path: Path):
    """The module of a reward file, executed once per version of the file."""
    if not path.is_file():
        raise ConfigError(f"reward {spec!r}: file not found: {path}")
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _FILE_MODULES:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(f"nanoseek_reward_{path.stem}_{digest}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"reward {spec!r}: cannot load {path}: {type(e).__name__}: {e}") from None
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def resolve_reward(spec: str | RewardFn, base: str | Path | None = None) -> RewardFn:
    """A callable, a built-in name (accuracy, format, think), `package.module:function`, or
    `path/to/file.py:function` (relative to `base`, default the working directory)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"reward {spec!r} must be a name, 'module:function' or 'file.py:function'")
    if spec in BUILTIN:
        return BUILTIN[spec]
    target, name = _split_spec(spec)
    if not target or not name:
        raise ConfigError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN)}, 'package.module:function' "
                          f"or 'path/to/file.py:function'")
    if _is_file(target):
        path = Path(target) if Path(target).is_absolute() else Path(base or Path.cwd()) / target
        module, where = _load_file(spec, path.resolve()), str(path)
    else:
        try:
            module, where = importlib.import_module(target), f"module {target}"
        except Exception as e:  # ImportError, or an error raised while the module ran
            raise ConfigError(f"reward {spec!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(f"reward {spec!r}: {where} has no function {name!r} "
                          f"(it defines: {', '.join(defined) or 'nothing callable'})")
    fn = getattr(module, name)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {name!r} in {where} is a {type(fn).__name__}, not a function")
    return fn


# ---- the weighted sum ---------------------------------------------------------------------------
class RewardItem(NamedTuple):
    name: str  # logged as reward_<name>
    fn: RewardFn
    weight: float
    label: str  # what errors call the function: its spec, or its qualified name


class Rewards:
    """A weighted sum of reward callables: `Rewards({"accuracy": 1.0, "format": 0.1, "my.py:brevity": 0.5})`
    (names: see reward_name; relative files against `base`) or `Rewards([(name, fn or spec, weight), ...])`.
    Calling it returns (total per completion, parts by name; NaN where a reward returned None)."""

    def __init__(self, spec: dict[str, float] | Sequence[tuple[str, RewardFn | str, float]],
                 base: str | Path | None = None):
        items = [(reward_name(s), s, w) for s, w in spec.items()] if isinstance(spec, dict) else list(spec)
        if not items:
            raise ConfigError("at least one reward is required")
        self.base = base
        self.items: list[RewardItem] = []
        for name, fn, weight in items:
            self.add(name, fn, weight)

    def add(self, name: str, fn: RewardFn | str, weight: float = 1.0) -> "Rewards":
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"reward {name!r} has a non-numeric weight {weight!r}")
        if any(item.name == name for item in self.items):
            raise ConfigError(f"two rewards are named {name!r} (a function's name names its reward): "
                              f"rename one of the functions")
        label = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.items.append(RewardItem(name, resolve_reward(fn, self.base), float(weight), label))
        return self

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **columns) -> tuple[list[float], dict[str, list[float]]]:
        n = len(completions)
        for key, values in {"prompts": prompts, **columns}.items():
            if len(values) != n:
                raise RewardError(f"reward column {key!r} has {len(values)} entries for {n} completions "
                                  f"(prompts, completions and every column need one entry per completion)")
        total, parts = [0.0] * n, {}
        for item in self.items:
            values = self._evaluate(item, prompts, completions, columns)
            parts[item.name] = [math.nan if v is None else v for v in values]
            total = [t if v is None else t + item.weight * v for t, v in zip(total, values)]
        return total, parts

    def _evaluate(self, item: RewardItem, prompts, completions, columns) -> list[float | None]:
        """One reward's values, checked: one finite number (or None) per completion."""
        who = f"reward {item.name!r} ({item.label})"
        try:
            out = item.fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardError(f"{who} raised {_where(e)}{_failing_row(item.fn, prompts, completions, columns)}") \
                from e
        try:
            out = list(out)
        except TypeError:
            raise RewardError(f"{who} returned a {type(out).__name__}, not a list of one value per completion") \
                from None
        if len(out) != len(completions):
            raise RewardError(f"{who} returned {len(out)} values for {len(completions)} completions")
        return [_value(who, v, i, prompts) for i, v in enumerate(out)]

    def describe(self) -> str:
        return " + ".join(f"{item.weight:g}*{item.name}" for item in self.items)


def _value(who: str, v: Any, row: int, prompts: Sequence[str]) -> float | None:
    """A returned value as a float (None stays None: not applicable); errors name the row."""
    if v is None:
        return None
    number = None
    if not isinstance(v, (str, bytes)):
        try:
            number = float(v)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number):
        raise RewardError(f"{who} returned {v!r} for row {row} (prompt {_short(prompts[row])}): "
                          f"each value must be a finite number or None")
    return number


def _where(e: Exception) -> str:
    """'TypeError: message at file.py:12' (the innermost frame: the line that raised)."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {e}{at}"


def _failing_row(fn: RewardFn, prompts, completions, columns) -> str:
    """Which row makes `fn` raise, found by calling it on each row alone (only after a failure)."""
    for i in range(len(completions)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return f" on row {i} (prompt {_short(prompts[i])})"
    return f" on the batch of {len(completions)} completions (no row raises alone)"


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
