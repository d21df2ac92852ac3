"""Answer verifiers for dataset tasks: `math` (math-verify), `exact`, `numeric`, `choice`, `regex`.

A verifier turns a gold answer from a file into its canonical text (`gold`, None when it cannot be
read: the row is counted and skipped, never scored), says whether an extracted answer matches it
(`check`) and what majority voting groups answers by (`vote_key`). Answers are the text the reply
format gives (see dataset.py); they are at most MAX_ANSWER_CHARS long.

    math     equivalence through math-verify: plain numbers, fractions, LaTeX (`\\frac{1}{2}` = 0.5 =
             1/2), equivalent expressions (`(x+1)^2` = `x^2+2x+1`), sets and intervals, `\\boxed{}`
             and `$...$` inside the answer, units written as `\\text{cm}` ignored (`72 dollars` is not
             72). Two plain numbers are compared exactly here (fractions.Fraction), without the library.
    exact    the stripped texts are equal
    numeric  both are numbers (`1,234.5`, `-3`, `2.5e3`, `3/4`) within a relative tolerance
    choice   the same multiple-choice letter: `B`, `(B)`, `b) ...`, `B. ...`, `B: ...`
    regex    the gold answer is a pattern the whole answer must match (re.fullmatch)

Time limits. math-verify can take forever: LaTeX nested 50 deep takes ~13 s to parse, and
`10^{10^{10}}` asks sympy for a ten-billion-digit power inside C code, where no signal reaches (so
math-verify's own signal.alarm timeout cannot help; it also works only on the main thread, and the
server and torch threads are not). So: answers longer than MAX_ANSWER_CHARS or nested deeper than
MAX_DEPTH are refused outright, and math and regex checks run in one worker process per Python
process (verify_worker.py, started on first use, shared by threads) that must answer each check
within `time_limit` seconds; when it does not, it is killed, the check is False, and the next check
starts a new worker. The round trip costs ~0.07 ms; math-verify itself 0.02 ms (`\\frac{1}{2}` vs
0.5, parses cached) to ~20 ms (`(x+1)^2` vs `x^2+2x+1`: sympy simplifies).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from ..errors import ConfigError
from .base import MAX_ANSWER_CHARS

MAX_DEPTH = 10  # nested ( [ { : antlr's LaTeX parsing slows down steeply with depth
DEFAULT_TIME_LIMIT = 2.0  # seconds per math / regex check
STARTUP_LIMIT = 60.0  # seconds for a new worker to import math-verify and answer its first ping
WORKER = Path(__file__).with_name("verify_worker.py")

_PLAIN = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d{1,64})(?:\.\d{1,64})?")  # 1,234.5 (no exponent)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,4})?")
_FRACTION = re.compile(r"([-+]?\d{1,64})\s*/\s*(\d{1,64})")
_CHOICE = (re.compile(r"\(([A-Za-z])\)(?:\s.*)?", re.S), re.compile(r"([A-Za-z])(?:[).:](?:\s.*)?)?", re.S))


# ---- pieces -------------------------------------------------------------------------------------
def boxed(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` in `text` (nested braces matched), outermost ones only, in
    order; an unclosed box ends the list."""
    out, i = [], 0
    while (start := text.find("\\boxed{", i)) >= 0:
        depth, j = 0, start + len("\\boxed")
        for j in range(j, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
        if depth:
            break
        out.append(text[start + len("\\boxed{"): j])
        i = j + 1
    return out


def unbox(answer: str) -> str:
    """The content of an answer that is exactly one `\\boxed{...}` (or `$\\boxed{...}$`), else the answer."""
    text = answer.strip().strip("$").strip()
    inside = boxed(text)
    if len(inside) == 1 and text.startswith("\\boxed{") and text.endswith("}") \
            and len(text) == len(inside[0]) + len("\\boxed{}"):
        return inside[0].strip()
    return answer


def nesting_depth(text: str) -> int:
    """The deepest nesting of ( [ { in text (closing brackets of any kind close one level)."""
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def screen(text: str) -> str | None:
    """Why `text` is refused before any parsing (too long, nested too deep), or None."""
    if len(text) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if nesting_depth(text) > MAX_DEPTH:
        return f"brackets nested deeper than {MAX_DEPTH}"
    return None


def plain_number(text: str) -> Fraction | None:
    """A plain decimal (`-1,234.50`) or fraction (`3/4`) as an exact Fraction; None for anything else
    (exponents included: `1e999999999` would be a billion-digit integer)."""
    text = text.strip()
    if _PLAIN.fullmatch(text):
        return Fraction(text.replace(",", ""))
    m = _FRACTION.fullmatch(text)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def parse_number(text: str) -> float | None:
    """A finite number in decimal, scientific or a/b form, commas as thousands separators; else None."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        value = float(text.replace(",", ""))
    elif (m := _FRACTION.fullmatch(text)) and int(m.group(2)) != 0:
        value = int(m.group(1)) / int(m.group(2))
    else:
        return None
    return value if math.isfinite(value) else None


def choice_letter(text: str) -> str | None:
    """The upper-case letter of a multiple-choice answer (`B`, `(b)`, `B) text`, `B. text`), or None."""
    text = unbox(text).strip()
    text = text[len("\\text{"):-1].strip() if text.startswith("\\text{") and text.endswith("}") else text
    for pattern in _CHOICE:
        if m := pattern.fullmatch(text):
            return m.group(1).upper()
    return None


# ---- the worker process -------------------------------------------------------------------------
class VerifyWorker:
    """A math-verify process (verify_worker.py) answering one JSON request per line, with a deadline
    per request; killed and replaced when it misses one. Thread-safe (one request at a time)."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self.timeouts = 0
        self.starts = 0

    def ask(self, request: dict, time_limit: float) -> tuple[bool, str | None]:
        """(verdict, why it failed or None). A missed deadline or a dead worker is (False, reason)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            return self._ask(request, time_limit)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        self._stop()
        self._proc = subprocess.Popen([sys.executable, "-u", str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self.starts += 1
        ok, why = self._ask({"op": "ping"}, STARTUP_LIMIT)
        if not ok:
            self._stop()
            raise ConfigError(f"the math-verify worker ({WORKER}) did not start: {why}; "
                              "is math-verify installed (pip install 'math-verify[antlr4_13_2]')?")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
        self._proc, self._buffer = None, b""

    def _ask(self, request: dict, time_limit: float) -> tuple[bool, str | None]:
        proc = self._proc
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._stop()
            return False, "the verifier process exited"
        line = self._read_line(time.monotonic() + time_limit)
        if line is None:
            self.timeouts += proc.poll() is None
            reason = f"no verdict within {time_limit:g}s" if proc.poll() is None else "the verifier process exited"
            self._stop()
            return False, reason
        reply = json.loads(line)
        return bool(reply["ok"]), reply.get("error")

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


_worker = VerifyWorker()
atexit.register(_worker.close)


def worker() -> VerifyWorker:
    """This process's shared worker (its `timeouts` and `starts` count what happened so far)."""
    return _worker


# ---- verifiers ----------------------------------------------------------------------------------
class Verifier:
    """Reads gold answers and checks extracted answers against them (see the module doc)."""

    name = "verifier"
    instruction = "the final answer"  # what the default prompt template asks for

    def __init__(self, time_limit: float = DEFAULT_TIME_LIMIT):
        if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit > 0):
            raise ConfigError(f"verifier time_limit must be a positive number of seconds, got {time_limit!r}")
        self.time_limit = float(time_limit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def gold(self, text: str) -> str | None:
        """The canonical gold answer, or None when it cannot be checked against."""
        text = text.strip()
        return text or None

    def check(self, answer: str, gold: str) -> bool:
        raise NotImplementedError

    def vote_key(self, answer: str):
        return " ".join(answer.split())


class ExactVerifier(Verifier):
    name = "exact"

    def check(self, answer: str, gold: str) -> bool:
        return answer.strip() == gold


class NumericVerifier(Verifier):
    name = "numeric"
    instruction = "only the final number"

    def __init__(self, tolerance: float = 1e-6, time_limit: float = DEFAULT_TIME_LIMIT):
        super().__init__(time_limit)
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ConfigError(f"numeric verifier tolerance must be a non-negative number, got {tolerance!r}")
        self.tolerance = float(tolerance)

    def gold(self, text: str) -> str | None:
        return text.strip() if parse_number(text) is not None else None

    def check(self, answer: str, gold: str) -> bool:
        got, want = parse_number(answer), parse_number(gold)
        return got is not None and want is not None and \
            math.isclose(got, want, rel_tol=self.tolerance, abs_tol=self.tolerance)

    def vote_key(self, answer: str):
        value = parse_number(answer)
        return ("number", value) if value is not None else ("text", super().vote_key(answer))


class ChoiceVerifier(Verifier):
    name = "choice"
    instruction = "only the letter of the correct choice"

    def gold(self, text: str) -> str | None:
        return choice_letter(text)

    def check(self, answer: str, gold: str) -> bool:
        return choice_letter(answer) == gold

    def vote_key(self, answer: str):
        return choice_letter(answer) or ("text", super().vote_key(answer))


class RegexVerifier(Verifier):
    """The gold answer is a Python regular expression; the answer must match all of it. Matching runs
    in the worker (a pattern such as `(a+)+$` backtracks for ages on a long answer)."""

    name = "regex"

    def gold(self, text: str) -> str | None:
        try:
            re.compile(text)
        except (re.error, RecursionError, OverflowError):
            return None
        return text if text else None

    def check(self, answer: str, gold: str) -> bool:
        if screen(answer) is not None:
            return False
        return _worker.ask({"op": "regex", "pattern": gold, "text": answer.strip()}, self.time_limit)[0]


class MathVerifier(Verifier):
    name = "math"

    def gold(self, text: str) -> str | None:
        text = text.strip()
        if not text or screen(text) is not None:
            return None
        if plain_number(text) is not None:
            return text
        ok, _ = _worker.ask({"op": "gold", "gold": text}, self.time_limit)
        return text if ok else None

    def check(self, answer: str, gold: str) -> bool:
        answer = answer.strip()
        if not answer or screen(answer) is not None:
            return False
        mine, theirs = plain_number(unbox(answer)), plain_number(gold)
        if mine is not None and theirs is not None:
            return mine == theirs
        return _worker.ask({"op": "math", "gold": gold, "answer": answer}, self.time_limit)[0]

    def vote_key(self, answer: str):
        value = plain_number(unbox(answer))
        return ("number", value) if value is not None else ("text", "".join(unbox(answer).split()))


VERIFIERS = {"math": MathVerifier, "exact": ExactVerifier, "numeric": NumericVerifier, "choice": ChoiceVerifier,
             "regex": RegexVerifier}


def get_verifier(name: str | Verifier, tolerance: float | None = None,
                 time_limit: float = DEFAULT_TIME_LIMIT) -> Verifier:
    """A verifier by name (ConfigError listing the known ones); `tolerance` is the numeric one's."""
    if isinstance(name, Verifier):
        return name
    if name not in VERIFIERS:
        raise ConfigError(f"unknown verifier {name!r}; choose one of {', '.join(VERIFIERS)}")
    if name == "numeric":
        return NumericVerifier(1e-6 if tolerance is None else tolerance, time_limit)
    return VERIFIERS[name](time_limit)
