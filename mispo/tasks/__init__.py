"""Built-in task generators, named in recipes as ``builtin:<name>``.

    get_task("arithmetic").train_rows(1000, seed=0, digits=[1, 2])

Each task (mispo.tasks.base.Task) has ``train_rows(n, seed, **opts)``, ``eval_rows(n, seed,
**opts)`` and ``sft_rows(n, seed, **opts)``, returning lists of row dicts with ``prompt`` and
``answer`` (SFT rows add ``completion``); eval problems never appear in train or SFT rows.
"""

from __future__ import annotations

from .arithmetic import ArithmeticTask
from .base import Task
from .calculator import CalculatorTask
from .chain import ChainTask
from .functions import FunctionsTask
from .humaneval import HumanEvalTask

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available as ``builtin:<task.name>``."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name`` (ValueError listing the known names otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown builtin task {name!r}; fix: use one of "
                         f"{', '.join('builtin:' + n for n in sorted(TASKS))}") from None


register_task(ArithmeticTask())
register_task(CalculatorTask())
register_task(ChainTask())
register_task(FunctionsTask())
register_task(HumanEvalTask())

__all__ = ["Task", "TASKS", "get_task", "register_task", "ArithmeticTask", "CalculatorTask", "ChainTask", "FunctionsTask",
           "HumanEvalTask"]
