"""Run trusted but possibly runaway computations (sympy) with a hard time limit.

``call(fn_spec, *args, alarm_s=..., deadline_s=...)`` sends the call to one of a few persistent
worker processes (``python -m mispo.sandbox.worker_main``). There the call runs in the main
thread, so SIGALRM-based timeouts work (they do not in the reward runner's threads); if a worker
does not answer by ``deadline_s`` (stuck in C code, e.g. a huge integer power) it is killed and
replaced. Pool size: ``$MISPO_WORKERS`` (default min(4, CPUs)). Functions must be importable as
``module:function`` under rewards., environments. or mispo., take and return JSON data.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time

STARTUP_GRACE_S = 30.0  # a fresh worker imports its modules (sympy) before answering


class WorkerTimeout(TimeoutError):
    """The call did not finish in time (the worker's alarm fired or the worker was killed)."""


class WorkerError(RuntimeError):
    """The function raised in the worker; the message is ``Type: message``."""


class _Worker:
    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "mispo.sandbox.worker_main"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     cwd=root, start_new_session=True)
        self.fresh = True

    def ask(self, message: dict, wait_s: float) -> dict | None:
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], wait_s)
        line = self.proc.stdout.readline() if ready else b""
        self.fresh = False
        return json.loads(line) if line else None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Pool:
    def __init__(self, size: int):
        self.idle: queue.Queue = queue.Queue()
        self.all: list[_Worker] = []
        self._lock = threading.Lock()
        for _ in range(size):
            self.idle.put(None)  # started on first use

    def close(self) -> None:
        with self._lock:
            workers, self.all = self.all, []
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill()
            worker.proc.stdin.close()
            worker.proc.stdout.close()

    def ask(self, message: dict, deadline_s: float) -> dict | None:
        worker = self.idle.get()
        try:
            if worker is None or worker.proc.poll() is not None:
                worker = _Worker()
                with self._lock:
                    self.all = [w for w in self.all if w.proc.poll() is None] + [worker]
            wait = deadline_s + (STARTUP_GRACE_S if worker.fresh else 0.0)
            reply = worker.ask(message, wait)
            if reply is None:
                worker.kill()
                worker = None
            return reply
        except (OSError, ValueError):
            if worker is not None:
                worker.kill()
            worker = None
            raise
        finally:
            self.idle.put(worker)


_pool: _Pool | None = None
_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = _Pool(int(os.environ.get("MISPO_WORKERS") or min(4, os.cpu_count() or 1)))
            atexit.register(_pool.close)
        return _pool


def call(fn_spec: str, *args, alarm_s: float | None = None, deadline_s: float = 30.0):
    """Run ``fn(*args)`` in a worker; raise WorkerTimeout or WorkerError on failure."""
    start = time.monotonic()
    reply = _get_pool().ask({"fn": fn_spec, "args": list(args), "alarm_s": alarm_s}, deadline_s)
    if reply is None:
        raise WorkerTimeout(f"{fn_spec} did not finish within {deadline_s:g}s; worker replaced")
    if reply.get("timeout"):
        raise WorkerTimeout(f"{fn_spec} exceeded its {alarm_s:g}s limit "
                            f"(after {time.monotonic() - start:.1f}s)")
    if "error" in reply:
        raise WorkerError(reply["error"])
    return reply["ok"]
