"""Code reward: run the model's program in the sandbox against the row's tests.

``score(prompt, completion, **row) -> {"score": fraction passed, "passed", "total", "feedback"}``

The program is the last ```python block of the completion, else the whole completion. Tests come
from the row, in one of two shapes:

- HumanEval style: ``test`` (source defining ``check(candidate)``, or bare asserts) and
  ``entry_point``. If the program does not define ``entry_point`` it is taken to be a function
  body and appended to ``prompt``, as HumanEval does; a full function is run after the prompt's
  code, so helpers the prompt defines stay available. Score 1 or 0.
- stdin/stdout: ``tests=[{"input": ..., "output": ...}, ...]`` (or APPS-style
  ``{"inputs": [...], "outputs": [...]}``). Score = fraction of cases passed.

Optional row fields: ``time_limit_s`` (per check / case, default 10), ``memory_mb`` (default 1024).
Passing is decided by the sandbox's checker or the host's output comparison, never by exit codes
or printed text (see mispo.sandbox).

Repeats are not re-run: ``score`` keeps the verdicts of the last ``CACHE_SIZE`` (program, tests, limits)
it ran, in this process, so the many identical samples of a converging policy (and of the merge's
rejection sampling) cost one sandbox run each. A verdict that involved a timeout is not kept (the next
run may finish on a less loaded machine).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from mispo.sandbox import Limits, run_function_tests, run_io_cases

_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


CACHE_SIZE = 8192
_cache: OrderedDict[str, "CodeResult"] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass
class CodeResult:
    passed: int
    total: int
    feedback: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


def extract_program(completion: str) -> str:
    """The last ```python (or ```py) block, or the whole text if there is none."""
    blocks = _BLOCK.findall(completion or "")
    return blocks[-1] if blocks else (completion or "")


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def defines(source: str, name: str) -> bool:
    """Whether ``source`` parses and binds ``name`` at top level (def, class or assignment)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                for t in node.targets):
            return True
    return False


def build_program(code: str, prompt: str | None, entry_point: str) -> str:
    """HumanEval program: full function after the prompt's code, or prompt + body."""
    prompt = prompt if isinstance(prompt, str) else ""
    if defines(code, entry_point):
        return prompt + "\n\n" + code if prompt and _parses(prompt) else code
    return prompt + code


def _io_cases(tests) -> list[dict]:
    if isinstance(tests, dict) and "inputs" in tests:
        return [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if isinstance(tests, list) and all(isinstance(t, dict) and "input" in t and "output" in t
                                       for t in tests):
        return tests
    raise ValueError("row field 'tests' must be a list of {'input': str, 'output': str} or "
                     "{'inputs': [...], 'outputs': [...]}; got " + repr(tests)[:200])


def evaluate(code: str, row: dict, *, prompt: str | None = None,
             limits: Limits | None = None) -> CodeResult:
    """Run ``code`` (already extracted) against the tests in ``row``."""
    limits = limits or Limits(wall_s=float(row.get("time_limit_s", 10.0)),
                              cpu_s=float(row.get("time_limit_s", 10.0)),
                              memory_mb=int(row.get("memory_mb", 1024)))
    if row.get("test") and row.get("entry_point"):
        entry = row["entry_point"]
        prelude = prompt if isinstance(prompt, str) and _parses(prompt) else None
        res = run_function_tests(build_program(code, prompt, entry), row["test"], entry,
                                 prelude=prelude, limits=limits)
        return CodeResult(int(res.passed), 1, [] if res.passed else [res.error or "failed"], res.timed_out)
    if row.get("tests") is not None:
        cases = _io_cases(row["tests"])
        if not cases:
            raise ValueError("row field 'tests' is empty; give at least one case")
        results = run_io_cases(code, cases, limits=limits,
                               time_budget_s=float(row.get("time_budget_s", 60.0)))
        return CodeResult(sum(r.passed for r in results), len(results),
                          [r.error for r in results if r.error], any(r.timed_out for r in results))
    raise ValueError("code reward needs row fields 'test' and 'entry_point' (HumanEval style) or "
                     "'tests' (stdin/stdout cases); this row has: " + ", ".join(sorted(row)))


def cached_evaluate(code: str, row: dict, prompt: str | None = None) -> CodeResult:
    """`evaluate`, remembering verdicts without timeouts (module docstring)."""
    fields = [code, prompt, row.get("test"), row.get("entry_point"), row.get("tests"), row.get("time_limit_s"),
              row.get("memory_mb"), row.get("time_budget_s")]
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return replace(_cache[key], feedback=list(_cache[key].feedback))
    res = evaluate(code, row, prompt=prompt)
    if not res.timed_out:
        with _cache_lock:
            _cache[key] = res
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return res


def score(prompt: str = "", completion: str = "", **row) -> dict:
    """Fraction of the row's tests the completion's program passes (see module docstring)."""
    res = cached_evaluate(extract_program(completion), row, prompt=prompt)
    return {"score": res.score, "passed": res.passed, "total": res.total,
            "feedback": "\n".join(res.feedback[:5])}
