"""Run HumanEval-style tests (``check(candidate)`` or bare asserts) against untrusted code.

The untrusted solution and the trusted tests run in two separate sandboxes. The checker calls
the solution's entry point through a pipe, passing only plain data (see guest/wire.py), and after
every check ran writes a verdict carrying a random nonce it read from the host on a pipe. So:

- exiting early (``sys.exit(0)``, ``os._exit(0)``), printing "PASSED", or a zero exit code score
  nothing: only the checker's verdict counts, and it is written only after all checks ran;
- the solution cannot monkeypatch the checker (``assert``, builtins, ``check``), return objects
  with a forged ``__eq__``, or read the nonce: it runs in another process, pid namespace and uid.

What remains: a solution may special-case the visible test inputs (the test is the test), and
the checker trusts the dataset's own test and prompt code (it runs them, sandboxed).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass

from mispo.sandbox.limits import Limits
from mispo.sandbox.process import Guest, slot


@dataclass
class CheckResult:
    """Verdict of one test run. ``error`` says what failed (test line, exception, timeout)."""

    passed: bool
    error: str | None
    timed_out: bool
    stdout: str
    stderr: str
    wall_s: float


def _read_all(fd: int, limit: int = 1 << 20) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def run_function_tests(solution: str, test: str, entry_point: str, *, prelude: str | None = None,
                       limits: Limits | None = None, backend: str | None = None,
                       seccomp: bool = True) -> CheckResult:
    """Check ``solution`` (source defining ``entry_point``) with ``test`` (source defining
    ``check(candidate)`` and/or top-level asserts naming ``entry_point`` or ``candidate``).

    ``prelude`` is trusted code run in the checker first (HumanEval's prompt, for helpers such as
    ``encode_cyclic`` that tests call).
    """
    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    to_srv_r, to_srv_w = os.pipe()
    to_chk_r, to_chk_w = os.pipe()
    res_r, res_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, (nonce + "\n").encode())
    os.close(nonce_w)
    files = {"test.py": test}
    if prelude:
        files["prelude.py"] = prelude
    server = Guest({"role": "serve", "entry_point": entry_point, "rpc_in": to_srv_r,
                    "rpc_out": to_chk_w, "seccomp": seccomp}, {"solution.py": solution},
                   limits=limits, pass_fds=(to_srv_r, to_chk_w), backend=backend)
    checker = Guest({"role": "check", "entry_point": entry_point, "rpc_in": to_chk_r,
                     "rpc_out": to_srv_w, "result_fd": res_w, "seccomp": seccomp}, files,
                    limits=limits, stdin=nonce_r, pass_fds=(to_chk_r, to_srv_w, res_w),
                    backend=backend)
    child_ends = [to_srv_r, to_chk_w, to_chk_r, to_srv_w, res_w, nonce_r]
    try:
        with slot():
            start = time.monotonic()
            try:
                server.start()
                checker.start()
            finally:
                for fd in child_ends:
                    os.close(fd)
                child_ends = []
            checker.wait(start + limits.wall_s)
            raw = _read_all(res_r)
            server.kill()
            wall = time.monotonic() - start
            out = server.result()
        passed, error = False, None
        try:
            verdict = json.loads(raw.decode()) if raw else None
        except ValueError:
            verdict = None
        if isinstance(verdict, dict) and verdict.get("nonce") == nonce:
            passed = verdict.get("passed") is True
            error = None if passed else str(verdict.get("error"))
        elif checker.timed_out:
            error = f"timed out after {limits.wall_s:g}s (infinite loop, sleep or slow solution)"
        else:
            chk = checker.result()
            error = f"the checker ended without a verdict (exit {chk.returncode}): {chk.stderr[-500:]}"
        return CheckResult(passed=passed, error=error, timed_out=checker.timed_out,
                           stdout=out.stdout, stderr=out.stderr, wall_s=wall)
    finally:
        for fd in child_ends + [res_r]:
            os.close(fd)
        server.cleanup()
        checker.cleanup()
