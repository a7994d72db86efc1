"""No call waits forever: how long the driver waits for a learner or rollout-engine call before it treats the
process as hung, stops it and recovers as from its death (`trainer.call_timeout_s`).

    limit(kind) = trainer.call_timeout_s                               when set
                = max(FLOOR_S, FACTOR x the slowest call of that kind so far)   otherwise

`kind` is the method's name (PolicyWorker.train, RolloutWorker.generate, ...). The floor covers first calls
(engine warm-up, DeepSpeed's first step); after that a call 10x slower than any before it is a hang.
"""

from __future__ import annotations

import time

FLOOR_S = 1800.0
FACTOR = 10.0


class CallTimedOut(RuntimeError):
    """A call to `role` (an actor class name) did not answer within its limit; the process was stopped."""

    def __init__(self, role: str, method: str, seconds: float):
        self.role, self.method, self.seconds = role, method, seconds
        super().__init__(f"{role}.{method} did not answer within {seconds:.0f} s (trainer.call_timeout_s); the "
                         "process was stopped as hung")


class CallTimeouts:
    """The limits of one run's calls, learnt from their durations (module docstring)."""

    def __init__(self, override_s: float | None = None, floor_s: float = FLOOR_S, factor: float = FACTOR):
        self.override_s, self.floor_s, self.factor = override_s, floor_s, factor
        self.slowest: dict[str, float] = {}

    def limit(self, kind: str) -> float:
        if self.override_s is not None:
            return self.override_s
        return max(self.floor_s, self.factor * self.slowest.get(kind, 0.0))

    def record(self, kind: str, seconds: float) -> None:
        self.slowest[kind] = max(seconds, self.slowest.get(kind, 0.0))

    def wait(self, refs: list, kind: str, on_timeout) -> list:
        """ray.get(refs) within limit(kind); past it `on_timeout(seconds)` runs (it stops the process and
        raises). Records the call's duration when it answers in time."""
        import ray

        start, limit = time.monotonic(), self.limit(kind)
        try:
            out = ray.get(refs, timeout=limit)
        except ray.exceptions.GetTimeoutError:
            on_timeout(limit)
            raise
        self.record(kind, time.monotonic() - start)
        return out
