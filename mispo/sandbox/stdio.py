"""Run a program against stdin/stdout test cases; the host, not the program, judges the output.

Each case runs in a fresh sandbox. A case passes when the program exits 0 within its limits and
its stdout matches the expected output (trailing whitespace and trailing blank lines ignored;
otherwise token by token, numbers equal within 1e-6 relative/absolute). Exit codes and anything
printed besides the answer cannot make a wrong answer pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mispo.sandbox.limits import Limits
from mispo.sandbox.process import run_program


@dataclass
class CaseResult:
    passed: bool
    timed_out: bool
    error: str | None


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _token_eq(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def outputs_match(got: str, expected: str, tol: float = 1e-6) -> bool:
    """Whether ``got`` is an acceptable rendering of ``expected`` (see module docstring)."""
    g, e = _lines(got), _lines(expected)
    if g == e:
        return True
    gt, et = " ".join(g).split(), " ".join(e).split()
    return len(gt) == len(et) and all(_token_eq(a, b, tol) for a, b in zip(gt, et))


def _show(text: str, n: int = 200) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def run_io_cases(program: str, cases: list[dict], *, limits: Limits | None = None,
                 backend: str | None = None, time_budget_s: float | None = None,
                 seccomp: bool = True) -> list[CaseResult]:
    """Run ``program`` once per case ``{"input": str, "output": str}``; cases left when
    ``time_budget_s`` is spent fail without running."""
    limits = limits or Limits()
    start = time.monotonic()
    results = []
    for i, case in enumerate(cases):
        if time_budget_s is not None and time.monotonic() - start > time_budget_s:
            results.append(CaseResult(False, False, f"case {i}: not run, time budget spent"))
            continue
        res = run_program(program, stdin=str(case.get("input", "")), limits=limits,
                          backend=backend, seccomp=seccomp)
        expected = str(case.get("output", ""))
        if res.timed_out:
            results.append(CaseResult(False, True, f"case {i}: timed out after {limits.wall_s:g}s"))
        elif res.returncode != 0:
            tail = res.stderr.strip().splitlines()[-1:] or [""]
            results.append(CaseResult(False, False, f"case {i}: exit code {res.returncode}: "
                                      f"{tail[0][:300]}"))
        elif not outputs_match(res.stdout, expected):
            results.append(CaseResult(False, False, f"case {i}: input {_show(str(case.get('input', '')))}"
                                      f" expected {_show(expected)} got {_show(res.stdout)}"))
        else:
            results.append(CaseResult(True, False, None))
    return results
