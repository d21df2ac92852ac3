"""Multi-digit addition (carry-heavy) and long multiplication, with column-by-column solver traces.

Addition trace for 347 + 589 (one line per column, right to left; after the colon, the digits of the
result written so far, so the last line holds the whole sum):

    7+9=16, carry 1: 6
    4+8+1=13, carry 1: 36
    3+5+1=9, carry 0: 936

Multiplication multiplies by each digit of the second operand the same way, shifts, and adds the
partial products with the addition trace.
"""

from __future__ import annotations

import random

from ..errors import DataError
from .base import Problem, Task


# ---- traces -------------------------------------------------------------------------------------
def addition_trace(a: int, b: int) -> tuple[list[str], int]:
    """Column-by-column addition of two non-negative integers: (lines, a + b)."""
    if a < 0 or b < 0:
        raise ValueError("addition_trace needs non-negative operands")
    da, db = str(a)[::-1], str(b)[::-1]
    lines, written, carry = [], "", 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        left = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry, digit = divmod(s, 10)
        written = str(digit) + written
        lines.append(f"{left}={s}, carry {carry}: {written}")
    if carry:
        written = str(carry) + written
        lines.append(f"carry {carry}: {written}")
    assert int(written) == a + b
    return lines, a + b


def digit_product_trace(a: int, d: int) -> tuple[list[str], int]:
    """a x one digit d, column by column: (lines, a * d)."""
    lines, written, carry = [], "", 0
    for ch in str(a)[::-1]:
        x = int(ch)
        p = x * d + carry
        left = f"{x}*{d}" + (f"+{carry}" if carry else "")
        carry, digit = divmod(p, 10)
        written = str(digit) + written
        lines.append(f"{left}={p}, carry {carry}: {written}")
    if carry:
        written = str(carry) + written
        lines.append(f"carry {carry}: {written}")
    return lines, a * d


def multiplication_trace(a: int, b: int) -> tuple[list[str], int]:
    """Long multiplication a x b: a times each digit of b (right to left), shifted, then summed."""
    if a < 0 or b < 0:
        raise ValueError("multiplication_trace needs non-negative operands")
    lines, partials = [], []
    for shift, ch in enumerate(str(b)[::-1]):
        d = int(ch)
        if d == 0:
            lines.append(f"{a}*{d}{'0' * shift}=0")
            partials.append(0)
            continue
        lines.append(f"{a}*{d}:")
        steps, product = digit_product_trace(a, d)
        lines += steps
        value = product * 10 ** shift
        lines.append(f"{a}*{d}{'0' * shift}={value}")
        partials.append(value)
    total = partials[0]
    for value in partials[1:]:
        lines.append(f"{total}+{value}:")
        steps, total = addition_trace(total, value)
        lines += steps
    assert total == a * b
    return lines, total


# ---- tasks --------------------------------------------------------------------------------------
def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


class Addition(Task):
    """a + b with both operands of `level` digits; each column carries with probability carry_rate."""

    family = "addition"
    all_levels = tuple(range(1, 19))

    def __init__(self, name: str, levels, carry_rate: float = 0.6, description: str = ""):
        super().__init__(name, levels, description)
        self.carry_rate = carry_rate

    def make(self, rng: random.Random, level: int) -> Problem:
        a_digits, b_digits, carry = [], [], 0
        for col in range(level):  # right to left
            top = col == level - 1
            x = rng.randint(1 if top else 0, 9)
            want_carry = rng.random() < self.carry_rate
            lo = 1 if top else 0
            choices = [y for y in range(lo, 10) if (x + y + carry >= 10) == want_carry] \
                or list(range(lo, 10))
            y = rng.choice(choices)
            carry = int(x + y + carry >= 10)
            a_digits.append(x)
            b_digits.append(y)
        a = int("".join(map(str, reversed(a_digits))))
        b = int("".join(map(str, reversed(b_digits))))
        if rng.random() < 0.5:
            a, b = b, a
        return self.problem(a, b, level)

    def problem(self, a: int, b: int, level: int | None = None) -> Problem:
        if a < 0 or b < 0:
            raise DataError("addition operands must be non-negative")
        return Problem(self.name, f"What is {a} + {b}?", str(a + b), {"a": a, "b": b},
                       key=f"{min(a, b)}+{max(a, b)}", level=level or len(str(max(a, b))))

    def solve(self, problem: Problem) -> str:
        return "\n".join(addition_trace(problem.data["a"], problem.data["b"])[0])


class Multiplication(Task):
    """a * b: level 1 is 2x2 digits, level 2 is 3x2 digits (the 3-digit operand first)."""

    family = "multiplication"
    all_levels = (1, 2)
    test_fraction = 0.2  # 2x2 has only ~4,000 unordered pairs: keep >1,000 ordered test problems
    SHAPES = {1: (2, 2), 2: (3, 2)}

    def make(self, rng: random.Random, level: int) -> Problem:
        da, db = self.SHAPES[level]
        a, b = _digits(rng, da), _digits(rng, db)
        if da == db and rng.random() < 0.5:
            a, b = b, a
        return self.problem(a, b, level)

    def problem(self, a: int, b: int, level: int | None = None) -> Problem:
        if a < 0 or b < 0:
            raise DataError("multiplication operands must be non-negative")
        level = level or (2 if max(len(str(a)), len(str(b))) >= 3 else 1)
        return Problem(self.name, f"What is {a} * {b}?", str(a * b), {"a": a, "b": b},
                       key=f"{min(a, b)}*{max(a, b)}", level=level)

    def solve(self, problem: Problem) -> str:
        return "\n".join(multiplication_trace(problem.data["a"], problem.data["b"])[0])
