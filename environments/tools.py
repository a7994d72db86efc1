"""Tools an environment offers the model: a calculator and sandboxed Python execution.

A tool is any object with ``name``, ``description`` and ``__call__(arguments: dict) -> str``; its
result text goes back to the model. Tools report bad input as text (``error: ...``), never raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from environments.calculator import calculate
from mispo.sandbox import Limits, run_program


class Tool(Protocol):
    name: str
    description: str

    def __call__(self, arguments: dict[str, Any]) -> str: ...


def _single(arguments: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        if key in arguments:
            return str(arguments[key])
    if len(arguments) == 1:
        return str(next(iter(arguments.values())))
    return None


@dataclass
class Calculator:
    name: str = "calc"
    description: str = ("Evaluate an arithmetic expression exactly (sympy). Arguments: "
                        "<expression>...</expression>. Supports + - * / ^ //, %, sqrt, log, "
                        "sin/cos/tan, factorial, binomial, gcd, pi, e.")
    timeout_s: float = 2.0

    def __call__(self, arguments: dict[str, Any]) -> str:
        expr = _single(arguments, "expression", "expr", "input")
        if expr is None:
            return "error: calc needs one argument, <expression>...</expression>"
        return calculate(expr, timeout_s=self.timeout_s)


@dataclass
class PythonExec:
    name: str = "python"
    description: str = ("Run a Python program in a sandbox (no network, no files kept) and get "
                        "its stdout/stderr. Arguments: <code>...</code>. Print what you need.")
    limits: Limits = Limits(wall_s=5.0, cpu_s=5.0, memory_mb=512)
    max_chars: int = 2000

    def __call__(self, arguments: dict[str, Any]) -> str:
        code = _single(arguments, "code", "input")
        if code is None:
            return "error: python needs one argument, <code>...</code>"
        res = run_program(code, limits=self.limits)
        parts = [res.stdout.rstrip()] if res.stdout.strip() else []
        if res.stderr.strip():
            parts.append("stderr:\n" + res.stderr.strip()[-self.max_chars // 2:])
        if res.timed_out:
            parts.append(f"error: timed out after {self.limits.wall_s:g}s")
        elif res.returncode != 0:
            parts.append(f"exit code {res.returncode}")
        text = "\n".join(parts) or "(no output)"
        return text if len(text) <= self.max_chars else text[: self.max_chars] + "\n[truncated]"


def default_tools() -> dict[str, Tool]:
    return {t.name: t for t in (Calculator(), PythonExec())}
