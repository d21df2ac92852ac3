"""Countdown: combine the given numbers, each exactly once, with + - * / and parentheses to hit a target.

The answer is an arithmetic expression such as `(25-5)*4+3`. It is checked by a small parser of our
own (never `eval`): only non-negative integer literals, the four operators and parentheses; no unary
minus, no other characters; at most MAX_EXPRESSION_CHARS characters and MAX_DEPTH nested parentheses.
Values are exact fractions, so `7/2*2` is 7; a division by zero makes the answer wrong, not an error.
The literals used must be exactly the given numbers (as a multiset: each once, all of them).
"""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

from .base import Problem, Task

MAX_EXPRESSION_CHARS = 128
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 6
OPS = "+-*/"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class ExpressionError(ValueError):
    """The text is not a valid Countdown expression (the message says why)."""


# ---- parsing and evaluation ---------------------------------------------------------------------
def tokenize(expr: str) -> list[str]:
    """Numbers, operators and parentheses of `expr`; whitespace is skipped, anything else refused."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens, i = [], 0
    while i < len(expr):
        ch = expr[i]
        if ch in " \t\n":
            i += 1
        elif ch in "0123456789":
            j = i
            while j < len(expr) and expr[j] in "0123456789":
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number {expr[i:j]!r} has more than {MAX_LITERAL_DIGITS} digits")
            tokens.append(expr[i:j])
            i = j
        elif ch in OPS or ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r}")
    return tokens


class _Parser:
    """Recursive descent: expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ;
    atom := NUMBER | '(' expr ')'. Builds (value, literals) as it goes."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.atom(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.atom(depth)
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / right
        return value

    def atom(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"more than {MAX_DEPTH} nested parentheses")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if token.isdigit():
            if len(token) > 1 and token[0] == "0":
                raise ExpressionError(f"number {token!r} has a leading zero")
            self.literals.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"unexpected {token!r}")


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """(exact value, integer literals in order) of a Countdown expression; ExpressionError if invalid."""
    tokens = tokenize(expr)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return value, parser.literals


def check_expression(expr: str, numbers: list[int], target: int) -> bool:
    """True when `expr` is valid, uses exactly `numbers` (each once) and equals `target`."""
    try:
        value, literals = evaluate(expr)
    except ExpressionError:
        return False
    return Counter(literals) == Counter(numbers) and value == target


# ---- solving ------------------------------------------------------------------------------------
def _combine(a, b, op: str):
    """Items are (value, expression, precedence); integer, positive intermediate results only."""
    (x, ex, px), (y, ey, py) = a, b
    if op == "+":
        v = x + y
    elif op == "-":
        v = x - y
        if v <= 0:
            return None
    elif op == "*":
        v = x * y
    else:
        if y == 0 or x % y:
            return None
        v = x // y
    p = _PRECEDENCE[op]
    left = f"({ex})" if px < p else ex
    right = f"({ey})" if py < p or (py == p and op in "-/") else ey
    return v, f"{left}{op}{right}", p


def solve_countdown(numbers: list[int], target: int) -> tuple[str, list[str]] | None:
    """(expression, steps like '25-5=20') reaching `target` with every number once, or None.
    Depth-first over pairs with integer positive intermediate results; failed states are memoised."""
    failed: set[tuple[int, ...]] = set()

    def search(items, steps):
        if len(items) == 1:
            return (items[0][1], steps) if items[0][0] == target else None
        state = tuple(sorted(v for v, _, _ in items))
        if state in failed:
            return None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                for op in OPS:
                    if op in "+*" and i > j:  # commutative: one order is enough
                        continue
                    item = _combine(items[i], items[j], op)
                    if item is None:
                        continue
                    rest = [it for k, it in enumerate(items) if k not in (i, j)]
                    found = search(rest + [item], steps + [f"{items[i][0]}{op}{items[j][0]}={item[0]}"])
                    if found:
                        return found
        failed.add(state)
        return None

    return search([(n, str(n), 3) for n in numbers], [])


class Countdown(Task):
    """`level` numbers (3 or 4) from 1..max_number; the target is built from all of them with integer
    steps and lies in 1..max_target, so every problem has a solution."""

    family = "countdown"
    all_levels = (2, 3, 4, 5)

    def __init__(self, name: str, levels, max_number: int = 30, max_target: int = 200, description: str = ""):
        super().__init__(name, levels, description)
        self.max_number, self.max_target = max_number, max_target

    def make(self, rng: random.Random, level: int) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(level)]
            for _ in range(20):
                target = self._random_target(rng, numbers)
                if target is not None and 1 <= target <= self.max_target and target not in numbers:
                    return self.problem(numbers, target, level)

    @staticmethod
    def _random_target(rng: random.Random, numbers: list[int]) -> int | None:
        items = [(n, str(n), 3) for n in numbers]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            item = _combine(items[i], items[j], rng.choice(OPS))
            if item is None:
                return None
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [item]
        return items[0][0]

    def problem(self, numbers: list[int], target: int, level: int | None = None) -> Problem:
        shown = ", ".join(map(str, numbers))
        prompt = f"Using the numbers {shown} once each, with + - * / and parentheses, make {target}."
        return Problem(self.name, prompt, str(target), {"numbers": list(numbers), "target": target},
                       key=f"{','.join(map(str, sorted(numbers)))}->{target}", level=level or len(numbers))

    def _solved(self, problem: Problem) -> tuple[str, list[str]]:
        found = solve_countdown(problem.data["numbers"], problem.data["target"])
        if found is None:  # generated problems always have one; a hand-made one may not
            raise ValueError(f"no integer solution for {problem.prompt!r}")
        return found

    def solve(self, problem: Problem) -> str:
        expression, steps = self._solved(problem)
        return "\n".join(steps + [f"so {expression}={problem.data['target']}"])

    def solution(self, problem: Problem) -> str:
        return self._solved(problem)[0]

    def check_answer(self, answer: str, problem: Problem) -> bool:
        return check_expression(answer, problem.data["numbers"], problem.data["target"])

    def vote_key(self, answer: str, problem: Problem):
        """Votes go to the value of a valid expression over the right numbers (any such expression
        that hits the target counts as the same answer); anything else votes for its own text."""
        try:
            value, literals = evaluate(answer)
        except ExpressionError:
            return ("text", "".join(answer.split()))
        if Counter(literals) != Counter(problem.data["numbers"]):
            return ("text", "".join(answer.split()))
        return ("value", value)
