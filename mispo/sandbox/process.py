"""Start one sandboxed Python guest, wait for it under a wall-clock limit, kill its whole tree.

Concurrency: :func:`slot` is a process-wide semaphore (``$MISPO_SANDBOX_SLOTS``, default the CPU
count); every job holds one while its guests run, so many rewards in parallel queue instead of
overloading the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from mispo.sandbox.isolation import guest_command, guest_env, select_backend
from mispo.sandbox.limits import Limits, RunResult

EXIT_SETUP_FAILED = 121
_SLOTS = threading.BoundedSemaphore(int(os.environ.get("MISPO_SANDBOX_SLOTS") or os.cpu_count() or 1))


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it): setup, missing backend, host error."""


@contextlib.contextmanager
def slot():
    """Hold one of the machine-wide sandbox slots."""
    with _SLOTS:
        yield


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (a sandbox uid, used by nothing else)."""
    for _ in range(5):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as fh:
                    uids = next(line for line in fh if line.startswith("Uid:")).split()
                if int(uids[1]) == uid:
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


class Guest:
    """One sandboxed guest process running ``guest/boot.py`` with config ``cfg``.

    ``files`` (name -> text) are the job's files the guest reads before it is locked down.
    ``stdin`` is bytes for the guest's stdin, or an fd (a pipe end) the caller manages.
    """

    def __init__(self, cfg: dict, files: dict[str, str], *, limits: Limits,
                 stdin: bytes | int | None = None, pass_fds=(), backend: str | None = None):
        self.cfg = dict(cfg)
        self.files = files
        self.limits = limits
        self.stdin = stdin
        self.pass_fds = tuple(pass_fds)
        self.backend = select_backend(backend)
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self.timed_out = False
        self.started = 0.0
        self.wall_s = 0.0

    def start(self) -> "Guest":
        self.tmp = tempfile.mkdtemp(prefix="mispo-sbx-")
        os.chmod(self.tmp, 0o711)
        job, scratch, out = (os.path.join(self.tmp, d) for d in ("job", "scratch", "out"))
        for d in (job, scratch, out):
            os.mkdir(d, 0o700)
        for name, text in self.files.items():
            with open(os.path.join(job, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        argv = guest_command(self.backend, self.cfg, job_dir=job, scratch_dir=scratch,
                             limits=self.limits)
        if self.cfg.get("uid") is not None:
            os.chown(scratch, self.cfg["uid"], self.cfg["uid"])
        self._out_path = os.path.join(out, "stdout")
        self._err_path = os.path.join(out, "stderr")
        stdin_file = None
        if isinstance(self.stdin, (bytes, str)):
            data = self.stdin.encode() if isinstance(self.stdin, str) else self.stdin
            in_path = os.path.join(out, "stdin")
            with open(in_path, "wb") as fh:
                fh.write(data)
            stdin_file = open(in_path, "rb")
            stdin = stdin_file
        elif isinstance(self.stdin, int):
            stdin = self.stdin
        else:
            stdin = subprocess.DEVNULL
        with open(self._out_path, "wb") as fout, open(self._err_path, "wb") as ferr:
            try:
                self.proc = subprocess.Popen(argv, stdin=stdin, stdout=fout, stderr=ferr,
                                             pass_fds=self.pass_fds, start_new_session=True,
                                             env=guest_env(self.cfg["cwd"]), cwd=self.tmp)
            except OSError as exc:
                raise SandboxError(f"cannot start sandbox ({self.backend}): {exc}") from exc
            finally:
                if stdin_file is not None:
                    stdin_file.close()
        self.started = time.monotonic()
        return self

    def wait(self, deadline: float) -> int | None:
        """Wait until ``deadline`` (time.monotonic()); on expiry kill the tree. Returns the code."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
        self.wall_s = time.monotonic() - self.started
        return self.proc.returncode

    def kill(self) -> None:
        """Kill the guest and everything it started (namespace teardown, group and uid kill)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.backend == "none" and self.cfg.get("uid") is not None:
            _kill_uid(self.cfg["uid"])  # processes that left the process group
        self.proc.wait()

    def _read(self, path: str) -> str:
        with open(path, "rb") as fh:
            data = fh.read(self.limits.max_output_bytes + 1)
        text = data[: self.limits.max_output_bytes].decode("utf-8", errors="replace")
        return text + ("\n[output truncated]" if len(data) > self.limits.max_output_bytes else "")

    def result(self) -> RunResult:
        assert self.proc is not None
        stderr = self._read(self._err_path)
        if self.proc.returncode == EXIT_SETUP_FAILED and stderr.startswith("sandbox setup failed"):
            raise SandboxError(stderr.strip())
        code = self.proc.returncode
        if self.backend == "bwrap" and code is not None and 128 < code < 128 + 65:
            code = -(code - 128)  # bwrap reports a child killed by signal N as 128 + N
        return RunResult(returncode=code, stdout=self._read(self._out_path),
                         stderr=stderr, timed_out=self.timed_out, wall_s=self.wall_s,
                         backend=self.backend)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def run_program(source: str, *, stdin: bytes | str = b"", limits: Limits | None = None,
                backend: str | None = None, seccomp: bool = True) -> RunResult:
    """Run ``source`` as a Python program (``__main__``) in the sandbox; return what it did."""
    limits = limits or Limits()
    with slot(), Guest({"role": "program", "seccomp": seccomp}, {"program.py": source},
                       limits=limits, stdin=stdin, backend=backend) as guest:
        guest.start()
        guest.wait(time.monotonic() + limits.wall_s)
        return guest.result()
