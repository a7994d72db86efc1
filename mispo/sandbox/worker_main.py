"""Worker process for :mod:`mispo.sandbox.workers`: runs trusted functions in its main thread.

Reads one JSON line per call, ``{"fn": "module:function", "args": [...], "alarm_s": float|null}``,
and writes one line back: ``{"ok": result}``, ``{"timeout": true}`` or ``{"error": "Type: msg"}``.
Only functions under the allowed package prefixes can be called. ``alarm_s`` arms SIGALRM around
the call (possible here, in a main thread); a call stuck in C code is the host's to kill.

Run as ``python -m mispo.sandbox.worker_main``.
"""

import importlib
import json
import resource
import signal
import sys

ALLOWED = ("rewards.", "environments.", "mispo.")


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm()


def _resolve(spec: str):
    module, _, attr = spec.partition(":")
    if not module.startswith(ALLOWED):
        raise PermissionError(f"{spec} is not under {ALLOWED}")
    return getattr(importlib.import_module(module), attr)


def main() -> None:
    limit = 4 << 30  # a runaway expression must not take the machine's memory with it
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    for line in sys.stdin:
        try:
            q = json.loads(line)
            fn = _resolve(q["fn"])
            if q.get("alarm_s"):
                signal.setitimer(signal.ITIMER_REAL, float(q["alarm_s"]))
            try:
                reply = {"ok": fn(*q.get("args", []))}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, _on_alarm)  # in case fn replaced it
        except _Alarm:
            reply = {"timeout": True}
        except MemoryError:
            reply = {"error": "MemoryError: the computation needed too much memory"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            text = json.dumps(reply)
        except (TypeError, ValueError) as exc:
            text = json.dumps({"error": f"unserialisable result: {exc}"})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
