"""Run model-written code: separate process trees, no network, resource limits, killed on timeout.

- :func:`run_program`: run a Python program with some stdin, get its exit code and output.
- :func:`run_io_cases`: stdin/stdout test cases, judged by the host.
- :func:`run_function_tests`: HumanEval-style ``check(candidate)`` tests, judged by a separate
  checker process that talks to the solution over a plain-data pipe.

Isolation backends and what each blocks: :mod:`mispo.sandbox.isolation`. Limits: :class:`Limits`.
"""

from mispo.sandbox.functional import CheckResult, run_function_tests
from mispo.sandbox.isolation import SandboxUnavailable, select_backend
from mispo.sandbox.limits import Limits, RunResult
from mispo.sandbox.process import SandboxError, run_program
from mispo.sandbox.stdio import CaseResult, outputs_match, run_io_cases

__all__ = [
    "CaseResult", "CheckResult", "Limits", "RunResult", "SandboxError", "SandboxUnavailable",
    "outputs_match", "run_function_tests", "run_io_cases", "run_program", "select_backend",
]
