"""What every reasoning task shares: problems, held-out splits, generation, and the strict reply format.

A reply (the text generated after the R1 generation prompt, which already opened `<think>\\n`) is
accepted only in exactly this shape:

    {reasoning without any tag}</think>{whitespace}<answer>{answer}</answer>{whitespace}[<｜end▁of▁sentence｜>]

`extract_answer` returns the stripped text between the answer tags, or None for anything else: no
`</think>`, a second `<think>`/`</think>`, answer tags inside the reasoning, zero or several answer
tags, nested tags, text after `</answer>`, chat special tokens, or an over-long answer. Each task then
compares that text exactly (integers in canonical form; Countdown: a safely parsed expression).

Train and test problems are told apart by a hash of what defines a problem (the unordered operands,
the numbers and the target), never by the generator's seed, so the splits are disjoint by construction
and the same whichever task variant, seed or difficulty produced a problem.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, DataError
from ..tokenizer import ASSISTANT, BOS, END_THINK, EOS, PAD, THINK, USER

SPLITS = ("train", "test")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_ANSWER_CHARS = 256  # longer answers are rejected before any parsing (huge numbers, junk)
_FORBIDDEN = (BOS, PAD, USER, ASSISTANT, THINK)
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")


@dataclass(frozen=True)
class Problem:
    """One task instance. `prompt` is the user message; `answer` the canonical answer (an integer in
    decimal; Countdown: its target); `data` the task's own fields (operands, numbers, target);
    `key` what identifies the problem for the train/test split; `level` its difficulty; `system` a
    system prompt put before the user message (datasets may have one; empty: none)."""

    task: str
    prompt: str
    answer: str
    data: dict = field(default_factory=dict, compare=False, hash=False)
    key: str = ""
    level: int = 0
    system: str = ""

    def as_dict(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer, "data": self.data,
                "key": self.key, "level": self.level, "system": self.system}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(d["task"], d["prompt"], str(d["answer"]), dict(d.get("data", {})), d.get("key", ""),
                   int(d.get("level", 0)), d.get("system", ""))

    def chat(self) -> list[dict]:
        """The conversation up to the user message: [system,] user."""
        user = {"role": "user", "content": self.prompt}
        return [{"role": "system", "content": self.system}, user] if self.system else [user]


# ---- the reply format ---------------------------------------------------------------------------
def strip_eos(completion: str) -> str:
    """The completion without one final end-of-sentence token (generation stops on it)."""
    return completion[: -len(EOS)] if completion.endswith(EOS) else completion


def split_reply(completion: str) -> tuple[str, str] | None:
    """(reasoning, tail after `</think>`) of a well-formed completion, or None.

    The completion must contain exactly one `</think>`, no `<think>` (the prompt opened the block),
    no answer tag before `</think>` and no chat special token; one trailing EOS is allowed."""
    text = strip_eos(completion)
    if text.count(END_THINK) != 1 or EOS in text or any(t in text for t in _FORBIDDEN):
        return None
    reasoning, tail = text.split(END_THINK)
    if ANSWER_OPEN in reasoning or ANSWER_CLOSE in reasoning:
        return None
    return reasoning, tail


def extract_answer(completion: str) -> str | None:
    """The stripped text of the single `<answer>...</answer>` after `</think>`, or None (see module doc)."""
    parts = split_reply(completion)
    if parts is None:
        return None
    tail = parts[1].strip()
    if tail.count(ANSWER_OPEN) != 1 or tail.count(ANSWER_CLOSE) != 1:
        return None
    if not (tail.startswith(ANSWER_OPEN) and tail.endswith(ANSWER_CLOSE)):
        return None  # text before <answer> or after </answer>
    answer = tail[len(ANSWER_OPEN): -len(ANSWER_CLOSE)].strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def parse_integer(text: str) -> str | None:
    """`text` if it is an integer in canonical decimal form (optional '-', no '+', no leading zeros,
    no separators), else None. Compared as strings, so a huge number is never converted."""
    return text if _INTEGER.fullmatch(text) and text != "-0" else None


def format_reply(reasoning: str, answer: str) -> str:
    """The completion text of a well-formed reply (what the solver's chat example renders to, after
    the generation prompt): `reasoning\\n</think>\\n\\n<answer>answer</answer>`."""
    return f"{reasoning}\n{END_THINK}\n\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


# ---- splits and seeds ---------------------------------------------------------------------------
def split_of(family: str, key: str, test_fraction: float) -> str:
    """'test' for a fixed `test_fraction` of keys (by sha256 of family:key), else 'train'."""
    h = int.from_bytes(hashlib.sha256(f"{family}:{key}".encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2.0 ** 64 else "train"


def make_rng(*parts: Any) -> random.Random:
    """A Random seeded from `parts` through sha256 (stable across Python versions and processes)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- the task interface -------------------------------------------------------------------------
class Task:
    """A family of problems with a generator, a step-by-step solver and a strict checker.

    Subclasses set `family`, `levels` (difficulty levels drawn from when none is asked) and implement
    `make(rng, level)`, `solve(problem) -> reasoning`, `solution(problem) -> answer text` and
    `check_answer(answer, problem)`."""

    family = "task"
    test_fraction = 0.1
    all_levels: tuple[int, ...] = ()  # every difficulty `make` accepts

    def __init__(self, name: str, levels: Iterable[int], description: str = ""):
        self.name = name
        self.levels = tuple(levels)
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, levels={self.levels})"

    # -- to implement ------------------------------------------------------------------------------
    def make(self, rng: random.Random, level: int) -> Problem:
        raise NotImplementedError

    def solve(self, problem: Problem) -> str:
        """The step-by-step reasoning a solver writes (the cold-start trace), without tags."""
        raise NotImplementedError

    def solution(self, problem: Problem) -> str:
        """The text the solver puts in the answer tag."""
        return problem.answer

    def extract(self, completion: str) -> str | None:
        """The answer of a well-formed completion, or None (the strict `<answer>` format by default)."""
        return extract_answer(completion)

    def check_answer(self, answer: str, problem: Problem) -> bool:
        """Exact comparison of an extracted answer; integers by default."""
        return parse_integer(answer) == problem.answer

    def vote_key(self, answer: str, problem: Problem):
        """What majority voting groups answers by (the canonical integer by default)."""
        return parse_integer(answer) or answer

    # -- shared ------------------------------------------------------------------------------------
    def check(self, completion: str, problem: Problem) -> bool:
        """True only for a well-formed completion whose answer is exactly right."""
        answer = self.extract(completion)
        return answer is not None and self.check_answer(answer, problem)

    def split_of(self, problem: Problem) -> str:
        return split_of(self.family, problem.key, self.test_fraction)

    def sample(self, rng: random.Random, split: str = "train", difficulty: int | None = None,
               max_tries: int = 10_000) -> Problem:
        """One problem of `split` (rejection on the split hash)."""
        _check_split(split)
        for _ in range(max_tries):
            problem = self.make(rng, self._level(rng, difficulty))
            if self.split_of(problem) == split:
                return problem
        raise DataError(f"task {self.name}: no {split} problem found in {max_tries} draws")

    def generate(self, n: int, seed: int = 0, split: str = "train", difficulty: int | None = None,
                 unique: bool = True) -> list[Problem]:
        """`n` problems of `split`, the same for the same arguments. unique: no prompt twice (raises
        DataError when the split holds fewer than n distinct problems)."""
        _check_split(split)
        if n < 0:
            raise DataError(f"number of problems must be non-negative, got {n}")
        rng = make_rng(self.name, split, seed, difficulty)
        out, seen = [], set()
        tries, max_tries = 0, 20 * n + 10_000
        while len(out) < n:
            tries += 1
            if tries > max_tries:
                raise DataError(f"task {self.name}: only {len(out)} distinct {split} problems found "
                                f"(asked for {n}); the {split} split of this difficulty is too small")
            problem = self.make(rng, self._level(rng, difficulty))
            if self.split_of(problem) != split or (unique and problem.prompt in seen):
                continue
            seen.add(problem.prompt)
            out.append(problem)
        return out

    def reply(self, problem: Problem) -> dict:
        """The solver's assistant message (R1 layout: reasoning_content + content)."""
        return {"role": "assistant", "reasoning_content": self.solve(problem),
                "content": f"{ANSWER_OPEN}{self.solution(problem)}{ANSWER_CLOSE}"}

    def messages(self, problem: Problem, with_reply: bool = True) -> list[dict]:
        return problem.chat() + [self.reply(problem)] if with_reply else problem.chat()

    def completion(self, problem: Problem) -> str:
        """The solver's reply as generated text after the generation prompt (checks True)."""
        return format_reply(self.solve(problem), self.solution(problem))

    def _level(self, rng: random.Random, difficulty: int | None) -> int:
        if difficulty is None:
            return rng.choice(self.levels)
        if difficulty not in (self.all_levels or self.levels):
            raise DataError(f"task {self.name}: difficulty {difficulty!r} is not one of "
                            f"{self.all_levels or self.levels}")
        return difficulty


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


# ---- prompts and reply lengths ------------------------------------------------------------------
def prompt_ids(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """R1 chat prompts (ending with `<｜Assistant｜><think>\\n`) for the problems."""
    chats = [p.chat() for p in problems]
    return [ids for ids, _ in tokenizer.encode_chats(chats, add_generation_prompt=True)]


def default_max_new_tokens(task: Task, tokenizer, problems: Sequence[Problem], margin: float = 1.5) -> int:
    """Room for 1.5x the longest solver reply among the problems (+16 tokens). A task without solver
    replies (a dataset without traces) cannot size them: ConfigError asking for max_new_tokens."""
    try:
        replies = [task.completion(p) for p in problems]
    except DataError as e:
        raise ConfigError(f"max_new_tokens must be given: no solver reply to size it by ({e})") from None
    longest = max((len(tokenizer.encode(r)) + 1 for r in replies), default=64)
    return int(margin * longest) + 16
