"""Reasoning tasks read from your own file: JSONL, JSON, CSV or Parquet (local files only).

    from nanoseek.tasks import load_dataset
    task = load_dataset("gsm8k.jsonl", verifier="math")   # a Task: eval, GRPO and distill take it
    task.generate(100, split="test")                        # Problems; data = the row's columns

Fields. The prompt comes from `question`, `problem` or `prompt` (the first the file has), the gold
answer from `answer`, `solution` or `final_answer`, SFT traces from `reasoning` or `trace`, a system
prompt from `system`, the split from `split`; each can be named instead (prompt_field, ...). The gold
answer is extracted: GSM8K's `... #### 72` gives 72 (commas removed) and its rationale before `####`
becomes the trace (calculator notes `<<48/2=24>>` removed); a MATH solution gives the content of its
last `\\boxed{...}` (nested braces) and is itself the trace; anything else is the answer as it stands.
A gold answer the verifier cannot read is counted, reported (a warning, and eval's JSON) and skipped.

Splits: a second file (test_file), a split column (`train` / `test`), or else a hash of the question
as for the built-in tasks (test_fraction of questions are test). A question found in both splits is
a warning; the same question twice in one split is an error.

Prompts: `template` with `{question}` (and any `{column}`); "default" appends an instruction that asks
for the answer in `<answer></answer>`, worded for the verifier; "plain" is the question alone (as the
built-in tasks, whose exports read back identically with it).

Replies. As for every task, the answer is read only after `</think>` and the strict rules of base.py
hold (one `</think>`, no answer tags in the reasoning, no special tokens). reply_format says what may
follow `</think>`: "answer": exactly `<answer>X</answer>` (the built-in format); "boxed": text with
exactly one `\\boxed{X}` and no answer tags (R1's math replies; a box inside the reasoning is never
read, two boxes after `</think>` are refused); "either" (default): both, and an answer that is a single
`\\boxed{X}` inside the tags counts as X.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

from ..data.sources import jsonl_records
from ..errors import ConfigError, DataError
from ..tokenizer import END_THINK, EOS
from .base import (ANSWER_CLOSE, ANSWER_OPEN, MAX_ANSWER_CHARS, SPLITS, Problem, Task, _FORBIDDEN, _check_split,
                   extract_answer, make_rng, split_of, split_reply)
from .registry import TASKS, register
from .verify import Verifier, boxed, get_verifier, unbox

PROMPT_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution", "final_answer")
TRACE_FIELDS = ("reasoning", "trace")
SYSTEM_FIELDS = ("system",)
SPLIT_FIELDS = ("split",)
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
REPLY_FORMATS = ("answer", "boxed", "either")
TEMPLATES = {"default": "{question}\n\nThink it through, then write {instruction} inside <answer></answer>.",
             "plain": "{question}"}
MAX_TAIL_CHARS = 2048  # a boxed reply's text after </think>
# load_dataset's options, as recipes and the command line name them
DATASET_OPTIONS = ("test_file", "prompt_field", "answer_field", "trace_field", "system_field", "split_field",
                   "test_fraction", "verifier", "tolerance", "template", "reply_format")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


# ---- reading files ------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(location, row) for every row of a JSONL / JSON / CSV / Parquet file; location is `file:line`
    (JSONL, CSV) or `file row N` (JSON, Parquet). DataError names the file and line of bad input."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"{path}: unknown dataset format {path.suffix!r}; use {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix == ".jsonl":
        rows = [(f"{path}:{line}", row) for line, row in jsonl_records(path)]
    else:
        rows = {".json": _read_json, ".csv": _read_csv}[suffix](path, path.read_bytes())
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark, as spreadsheets write, dropped); DataError at the line
    of the first invalid byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def _read_json(path: Path, data: bytes) -> list[tuple[str, dict]]:
    try:
        doc = json.loads(_decode(path, data))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f"{path}: a JSON dataset is a list of objects or {{\"data\": [...]}}")
    for i, row in enumerate(doc, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: a row must be a JSON object, got {type(row).__name__}")
    return [(f"{path} row {i}", row) for i, row in enumerate(doc, 1)]


def _read_csv(path: Path, data: bytes) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(_decode(path, data), newline=""))
    rows = []
    try:
        for row in reader:
            cells = {k: v for k, v in row.items() if k is not None and v is not None}  # ragged rows: no extras
            rows.append((f"{path}:{reader.line_num}", cells))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors say what is wrong with the file
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _jsonable(value: Any, location: str) -> Any:
    """A row's value as JSON (bytes decoded, dates and decimals as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{location}: a value is not valid UTF-8") from None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, location) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, location) for v in value]
    return str(value)


# ---- gold answers -------------------------------------------------------------------------------
def extract_gold(text: str) -> tuple[str, str | None]:
    """(gold answer, trace or None) of an answer field: GSM8K `rationale #### 72` -> ('72', rationale);
    a MATH solution -> (content of its last \\boxed{}, the solution); anything else -> (text, None)."""
    if "####" in text:
        rationale, _, final = text.rpartition("####")
        final = final.strip()
        if re.fullmatch(r"[-+]?\$?[\d,]+(\.\d+)?", final):
            final = final.replace(",", "").replace("$", "")
        trace = _CALCULATOR.sub("", rationale).strip()
        return final, trace or None
    boxes = boxed(text)
    if boxes:
        final = boxes[-1].strip()
        only_the_box = text.strip().strip("$").strip() == f"\\boxed{{{boxes[-1]}}}"
        return final, None if only_the_box else text.strip()
    return text.strip(), None


# ---- the task -----------------------------------------------------------------------------------
class DatasetTask(Task):
    """A task over the rows of a local file (see the module doc). `problems[split]` holds the usable
    problems in file order; `skipped` the rows whose gold answer the verifier cannot read."""

    family = "dataset"

    def __init__(self, path: str | Path, *, test_file: str | Path | None = None, name: str | None = None,
                 prompt_field: str | None = None, answer_field: str | None = None, trace_field: str | None = None,
                 system_field: str | None = None, split_field: str | None = None, verifier: str | Verifier = "math",
                 template: str = "default", reply_format: str = "either", tolerance: float | None = None,
                 test_fraction: float = 0.1):
        self.path = Path(path)
        self.test_file = Path(test_file) if test_file else None
        super().__init__(name or default_name(self.path), (0,), description=f"dataset {self.path}")
        if reply_format not in REPLY_FORMATS:
            raise ConfigError(f"unknown reply_format {reply_format!r}; choose one of {', '.join(REPLY_FORMATS)}")
        if not (isinstance(test_fraction, (int, float)) and 0 <= test_fraction <= 1):
            raise ConfigError(f"test_fraction must be in [0, 1] (1: every question is test), got {test_fraction!r}")
        self.verifier = get_verifier(verifier, tolerance)
        self.reply_format, self.test_fraction = reply_format, test_fraction
        self.template = TEMPLATES.get(template, template).replace("{instruction}", self.verifier.instruction)
        if "{question}" not in self.template:
            raise ConfigError(f"prompt template {template!r} must contain {{question}} (or be one of "
                              f"{', '.join(TEMPLATES)})")
        self.fields = {"prompt": prompt_field, "answer": answer_field, "trace": trace_field,
                       "system": system_field, "split": split_field}
        self.problems: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        self.skipped: list[dict] = []
        self.overlap: list[str] = []
        self._traces: dict[Problem, str | None] = {}
        self._where: dict[Problem, str] = {}
        self._load()
        register(self)  # rewards find a problem's task by its name

    def __repr__(self) -> str:
        return f"DatasetTask({self.name!r}, {str(self.path)!r}, verifier={self.verifier.name!r})"

    # -- loading --------------------------------------------------------------------------------
    def _load(self) -> None:
        files = [(self.path, "train" if self.test_file else None)]
        if self.test_file:
            files.append((self.test_file, "test"))
        seen: dict[tuple[str, str], str] = {}
        for path, split in files:
            rows = read_rows(path)
            fields = self._resolve_fields(rows[0][1], path, split is None)
            for location, row in rows:
                problem, where = self._problem(location, row, fields, split)
                if problem is None:
                    continue
                where = where or self.split_of(problem)
                if (where, problem.key) in seen:
                    raise DataError(f"{location}: duplicate question (also at {seen[where, problem.key]}); "
                                    "remove one of the rows")
                seen[where, problem.key] = location
                self.problems[where].append(problem)
                self._where[problem] = location
        self._report()

    def _resolve_fields(self, first: dict, path: Path, needs_split: bool) -> dict:
        """Column names for this file: the given ones, else the first default the first row has."""
        out = {}
        for role, defaults in (("prompt", PROMPT_FIELDS), ("answer", ANSWER_FIELDS), ("trace", TRACE_FIELDS),
                               ("system", SYSTEM_FIELDS), ("split", SPLIT_FIELDS)):
            given = self.fields[role]
            out[role] = given or next((f for f in defaults if f in first), None)
            if out[role] is None and role in ("prompt", "answer"):
                raise DataError(f"{path}: no {role} field (looked for {', '.join(defaults)}; the first row has "
                                f"{_fields(first)}); name it with --{role}-field")
        if not needs_split:
            out["split"] = None
        return out

    def _problem(self, location: str, row: dict, fields: dict, split: str | None
                 ) -> tuple[Problem | None, str | None]:
        """(the row's Problem, its split from the file or column, None: by hash); (None, None) when its
        gold answer cannot be read (the row goes to `skipped`)."""
        for role in ("prompt", "answer"):
            if row.get(fields[role]) is None:
                raise DataError(f"{location}: no field {fields[role]!r} (the row has {_fields(row)})")
        question = _text(row[fields["prompt"]], location, fields["prompt"])
        if not question.strip():
            raise DataError(f"{location}: empty prompt in field {fields['prompt']!r}")
        answer_text = _text(row[fields["answer"]], location, fields["answer"])
        final, derived_trace = extract_gold(answer_text)
        gold = self.verifier.gold(final)
        if gold is None:
            self.skipped.append({"location": location, "answer": answer_text[:200],
                                 "reason": f"the {self.verifier.name} verifier cannot read {final[:80]!r}"})
            return None, None
        trace = row.get(fields["trace"]) if fields["trace"] else None
        trace = _text(trace, location, fields["trace"]) if trace is not None else derived_trace
        system = _text(row[fields["system"]], location, fields["system"]) if row.get(fields["system"] or "") else ""
        if split is None and fields["split"] is not None:
            split = _split_value(row.get(fields["split"]), location, fields["split"])
        problem = Problem(self.name, self._render(question, row), gold, _jsonable(row, location),
                          key=" ".join(question.split()), system=system)
        self._traces[problem] = trace
        return problem, split

    def _render(self, question: str, row: dict) -> str:
        def fill(m: re.Match) -> str:
            name = m.group(1)
            if name == "question":
                return question
            return str(row[name]) if name in row else m.group(0)
        return _PLACEHOLDER.sub(fill, self.template)

    def _report(self) -> None:
        if self.skipped:
            first = "; ".join(f"{s['location']}: {s['reason']}" for s in self.skipped[:3])
            warnings.warn(f"{self.path}: skipped {len(self.skipped)} row(s) whose gold answer the "
                          f"{self.verifier.name} verifier cannot read ({first})", stacklevel=3)
        train_keys = {p.key for p in self.problems["train"]}
        self.overlap = [p.key for p in self.problems["test"] if p.key in train_keys]
        if self.overlap:
            warnings.warn(f"{self.name}: {len(self.overlap)} question(s) are in both the train and the test "
                          f"split (first: {self.overlap[0][:80]!r})", stacklevel=3)

    def report(self) -> dict:
        """What was read: files, fields, verifier, problems per split, skipped rows (the first 5), the
        questions found in both splits. Eval writes it into its JSON."""
        return {"file": str(self.path), "test_file": str(self.test_file) if self.test_file else None,
                "fields": {k: v for k, v in self.fields.items() if v}, "verifier": self.verifier.name,
                "reply_format": self.reply_format, "template": self.template,
                "problems": {s: len(self.problems[s]) for s in SPLITS},
                "unparseable_gold": {"count": len(self.skipped), "first": self.skipped[:5]},
                "in_both_splits": len(self.overlap)}

    # -- the Task interface ---------------------------------------------------------------------
    def split_of(self, problem: Problem) -> str:
        return split_of(self.family, problem.key, self.test_fraction)

    def make(self, rng, level: int) -> Problem:
        return self.sample(rng)

    def sample(self, rng, split: str = "train", difficulty: int | None = None, max_tries: int = 0) -> Problem:
        """A problem of `split` drawn uniformly (with replacement) by `rng`."""
        return rng.choice(self._split(split, difficulty))

    def generate(self, n: int, seed: int = 0, split: str = "train", difficulty: int | None = None,
                 unique: bool = True) -> list[Problem]:
        """n problems of `split`: a seeded choice of n, in file order; all of them (with a warning)
        when the split holds fewer than n."""
        problems = self._split(split, difficulty)
        if n < 0:
            raise DataError(f"number of problems must be non-negative, got {n}")
        if n >= len(problems):
            if n > len(problems):
                warnings.warn(f"{self.name}: asked for {n} {split} problems, the file has {len(problems)}: "
                              "using all of them", stacklevel=2)
            return list(problems)
        chosen = sorted(make_rng(self.name, split, seed).sample(range(len(problems)), n))
        return [problems[i] for i in chosen]

    def _split(self, split: str, difficulty: int | None) -> list[Problem]:
        _check_split(split)
        if difficulty is not None:
            raise DataError(f"task {self.name}: a dataset has no difficulty levels (got {difficulty!r})")
        if not self.problems[split]:
            source = self.test_file if split == "test" and self.test_file else self.path
            raise DataError(f"{self.name}: no {split} problems in {source} (the split comes from a split column, "
                            "--test-file, or --test-fraction of the questions)")
        return self.problems[split]

    def has_traces(self, split: str = "train") -> bool:
        """Whether every problem of `split` has a reasoning trace (SFT data, reply lengths)."""
        return bool(self.problems[split]) and all(self._traces.get(p) for p in self.problems[split])

    def solve(self, problem: Problem) -> str:
        trace = self._traces.get(problem)
        where = self._where.get(problem, self.name)
        if not trace:
            raise DataError(f"{where}: no reasoning trace (no {self.fields['trace'] or '/'.join(TRACE_FIELDS)} "
                            "field, and the answer is no GSM8K or MATH solution); a solver reply needs one")
        if END_THINK in trace or ANSWER_OPEN in trace or ANSWER_CLOSE in trace or EOS in trace \
                or any(t in trace for t in _FORBIDDEN):
            raise DataError(f"{where}: the reasoning trace holds a tag or chat special token")
        return trace

    def solution(self, problem: Problem) -> str:
        if self.verifier.name == "regex":
            raise DataError(f"{self.name}: a regex gold answer is a pattern, not an answer to write in a reply")
        return problem.answer

    def extract(self, completion: str) -> str | None:
        if self.reply_format != "boxed":
            answer = extract_answer(completion)
            if answer is not None:
                return answer if self.reply_format == "answer" else unbox(answer)
        if self.reply_format == "answer":
            return None
        return boxed_reply(completion)

    def check_answer(self, answer: str, problem: Problem) -> bool:
        return self.verifier.check(answer, problem.answer)

    def vote_key(self, answer: str, problem: Problem):
        return self.verifier.vote_key(answer)


def boxed_reply(completion: str) -> str | None:
    """The content of the single `\\boxed{}` after `</think>` of a well-formed completion with no
    answer tags, or None (see the module doc)."""
    parts = split_reply(completion)
    if parts is None:
        return None
    tail = parts[1]
    if ANSWER_OPEN in tail or ANSWER_CLOSE in tail or len(tail) > MAX_TAIL_CHARS or tail.count("\\boxed") != 1:
        return None
    boxes = boxed(tail)
    answer = boxes[0].strip() if len(boxes) == 1 else ""
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


def _text(value: Any, location: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{location}: field {field!r} must be text or a number, got {type(value).__name__}")


def _split_value(value: Any, location: str, field: str) -> str:
    if value not in SPLITS:
        raise DataError(f"{location}: field {field!r} is {value!r}; a split is one of {', '.join(SPLITS)}")
    return value


def _fields(row: dict) -> str:
    names = list(row)
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "no fields"


def default_name(path: Path) -> str:
    """The file's stem, with `-dataset` added when that is a built-in task's name."""
    stem = path.stem
    taken = stem in TASKS and not isinstance(TASKS[stem], DatasetTask)
    return f"{stem}-dataset" if taken else stem


# ---- loading (cached) and registering -----------------------------------------------------------
_CACHE: dict[tuple, DatasetTask] = {}


def load_dataset(path: str | Path, **options) -> DatasetTask:
    """The DatasetTask of a file (options as DatasetTask's), registered under its name so that
    `get_task(problem.task)` finds it. Loading again with the same file (unchanged) and options returns
    the same task without reading the file again. Options that are None or "" take their defaults."""
    options = {k: v for k, v in options.items() if v is not None and v != ""}
    files = [Path(path)] + ([Path(options["test_file"])] if options.get("test_file") else [])
    stamp = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (str(f),)
                  for f in files)
    key = (stamp, tuple(sorted((k, str(v)) for k, v in options.items())))
    task = _CACHE.get(key)
    if task is None:
        task = _CACHE[key] = DatasetTask(path, **options)
    return register(task)


# ---- built-in tasks as datasets -----------------------------------------------------------------
EXPORT_OPTIONS = "--verifier exact --template plain --reply-format answer"  # reads an export as the task


def export_task(task: Task, path: str | Path, n: int, seed: int = 0, split: str = "test") -> Path:
    """n problems of a built-in task as a JSONL dataset (question, answer, reasoning, split per row).
    Read back with verifier exact, template plain and reply_format answer (EXPORT_OPTIONS), it gives
    the same prompts, rewards and accuracy as the task. Tasks whose checker needs more than the gold
    answer (Countdown accepts any expression over the given numbers that reaches the target) refuse."""
    if type(task).check_answer is not Task.check_answer:
        raise DataError(f"task {task.name} checks answers against the problem itself, not a gold answer (any "
                        "expression over its numbers that reaches the target is right): no dataset verifier "
                        "gives the same verdicts, so it cannot be exported")
    problems = task.generate(n, seed=seed, split=split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            row = {"question": p.prompt, "answer": task.solution(p), "reasoning": task.solve(p), "split": split}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
