"""The registered tasks by name: TASKS, `register` and `get_task` (rewards look tasks up here too)."""

from __future__ import annotations

from ..errors import DataError
from .arithmetic import Addition, Multiplication
from .base import Task
from .countdown import Countdown

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


register(Addition("addition", (3, 4, 5, 6), description="a + b, 3 to 6 digits, carry-heavy"))
for _d in (3, 4, 5, 6):
    register(Addition(f"addition{_d}", (_d,), description=f"a + b, {_d} digits each, carry-heavy"))
register(Multiplication("multiplication", (1, 2), description="a * b, 2x2 and 3x2 digits"))
register(Multiplication("multiplication2x2", (1,), description="a * b, 2x2 digits"))
register(Multiplication("multiplication3x2", (2,), description="a * b, 3x2 digits"))
register(Countdown("countdown", (3, 4), description="reach a target from 3-4 numbers with + - * /"))
register(Countdown("countdown3", (3,), description="reach a target from 3 numbers with + - * /"))
register(Countdown("countdown4", (4,), description="reach a target from 4 numbers with + - * /"))


def get_task(name: str) -> Task:
    """The registered task called `name` (DataError listing the known ones otherwise)."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
