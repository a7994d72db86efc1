"""Score a batch of samples with a reward plugin: concurrent, time-limited, failure-tolerant.

Contract of a reward plugin: ``fn(prompt=..., completion=..., **row) -> float | {"score": float, ...}``,
sync or ``async def``. The runner calls it once per sample (sync plugins in a thread pool), each
call under ``timeout_s``. A call that raises, times out, or returns something other than a finite
number (or a dict with a finite ``score``) gets ``failure_score``, is logged as a warning with the
sample's id, and is counted in ``reward/failures`` / ``reward/timeouts``; it never stops the run.
A plugin without ``**kwargs`` is called with only the row fields it names.

Note: Python cannot kill a thread, so a sync plugin that ignores its timeout keeps one pool thread
busy until it returns; CPU-heavy or untrusted work belongs in subprocesses (rewards.code uses the
sandbox, rewards.math a worker process) which enforce their own limits.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

_RESERVED = {"mean", "std", "min", "max", "failures", "timeouts", "failure_rate", "latency_s"}


class BadRewardValue(TypeError):
    """A reward plugin returned something that is not a finite score."""


def coerce_score(value: Any) -> tuple[float, dict]:
    """Return ``(score, extras)`` from a plugin's return value, or raise BadRewardValue."""
    extras: dict = {}
    raw = value
    if isinstance(value, Mapping):
        if "score" not in value:
            raise BadRewardValue(f"returned a dict without 'score' (keys: {sorted(value)[:10]}); "
                                 "expected a finite float or a dict with a finite float 'score'")
        extras = {k: v for k, v in value.items() if k != "score"}
        value = value["score"]
    if hasattr(value, "item") and not isinstance(value, numbers.Real):
        try:
            value = value.item()  # 0-d numpy array / torch tensor
        except Exception:
            pass
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isfinite(score):
            return score, extras
    shown = repr(raw)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    raise BadRewardValue(f"returned {shown} ({type(raw).__name__}); expected a finite float or a "
                         "dict with a finite float 'score'")


def _accepted(fn: Callable) -> set[str] | None:
    """Names of keyword arguments ``fn`` accepts, or None if it takes **kwargs (or is opaque)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {p.name for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


async def call_plugin(fn: Callable, kwargs: Mapping[str, Any], executor=None) -> Any:
    """Call ``fn(**kwargs)``: awaited if async, else in ``executor`` (a thread pool)."""
    accepted = _accepted(fn)
    if accepted is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if _is_async(fn):
        result = fn(**kwargs)
    else:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor, functools.partial(fn, **kwargs))
    if inspect.isawaitable(result):
        result = await result
    return result


class CombinedReward:
    """Weighted sum of reward plugins: ``score = sum(weight_i * score_i)``.

    ``parts`` is a list of ``(fn, weight, name)``. The result dict has ``score`` and, per component,
    ``reward/<name>`` (its unweighted score) plus its extras as ``<name>/<key>``. Components run
    concurrently; if one fails (raises or returns a bad value) the whole sample fails.
    """

    def __init__(self, parts: Sequence[tuple[Callable, float, str]]):
        if not parts:
            raise ValueError("CombinedReward needs at least one (fn, weight, name) component")
        self.parts = [(fn, float(w), str(name)) for fn, w, name in parts]

    async def __call__(self, **kwargs) -> dict:
        results = await asyncio.gather(*(call_plugin(fn, kwargs) for fn, _, _ in self.parts))
        out: dict = {"score": 0.0}
        for (fn, weight, name), value in zip(self.parts, results):
            try:
                score, extras = coerce_score(value)
            except BadRewardValue as exc:
                raise BadRewardValue(f"component '{name}' {exc}") from None
            out["score"] += weight * score
            out[f"reward/{name}"] = score
            out.update({f"{name}/{k}": v for k, v in extras.items()})
        return out

    def __repr__(self) -> str:
        return "CombinedReward(" + ", ".join(f"{n}={w:g}" for _, w, n in self.parts) + ")"


@dataclass
class RewardBatch:
    """Per-sample scores and extras, which samples failed, and batch metrics."""

    scores: list[float]
    extras: list[dict]
    failed: list[bool]
    metrics: dict[str, float] = field(default_factory=dict)


class RewardRunner:
    """Runs one reward plugin over batches of samples (mappings with prompt, completion, row fields).

    A sample's id for logs is its ``id_key`` field (default ``"id"``), else its index in the batch.
    """

    def __init__(self, fn: Callable, *, timeout_s: float = 60.0, failure_score: float = 0.0,
                 max_concurrency: int = 256, max_threads: int | None = None,
                 name: str | None = None, id_key: str = "id", max_logged: int = 20):
        self.fn = fn
        self.timeout_s = float(timeout_s)
        self.failure_score = float(failure_score)
        self.max_concurrency = int(max_concurrency)
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)
        self.id_key = id_key
        self.max_logged = max_logged
        self._executor = ThreadPoolExecutor(max_workers=max_threads or min(32, (os.cpu_count() or 1) + 4),
                                            thread_name_prefix="mispo-reward")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _one(self, sample: Mapping, sem: asyncio.Semaphore):
        async with sem:
            start = time.perf_counter()
            try:
                value = await asyncio.wait_for(call_plugin(self.fn, sample, self._executor),
                                               self.timeout_s)
                score, extras = coerce_score(value)
                return score, extras, None, time.perf_counter() - start
            except asyncio.TimeoutError:
                return None, {}, ("timeout", f"timed out after {self.timeout_s:g}s"), self.timeout_s
            except BadRewardValue as exc:
                return None, {}, ("failure", str(exc)), time.perf_counter() - start
            except Exception as exc:  # the plugin's own bug: never stop the run
                return None, {}, ("failure", f"raised {type(exc).__name__}: {exc}"), \
                    time.perf_counter() - start

    async def ascore(self, samples: Sequence[Mapping]) -> RewardBatch:
        """Score ``samples`` concurrently; see the module docstring for failure handling."""
        sem = asyncio.Semaphore(self.max_concurrency)
        outs = await asyncio.gather(*(self._one(s, sem) for s in samples))
        scores, extras, failed = [], [], []
        failures = timeouts = logged = 0
        latency = 0.0
        for i, (score, extra, err, dt) in enumerate(outs):
            latency += dt
            if err is None:
                scores.append(score)
                extras.append(extra)
                failed.append(False)
                continue
            kind, msg = err
            timeouts += kind == "timeout"
            failures += kind == "failure"
            scores.append(self.failure_score)
            extras.append({"error": msg})
            failed.append(True)
            if logged < self.max_logged:
                sid = samples[i].get(self.id_key, i) if isinstance(samples[i], Mapping) else i
                logger.warning("reward %s: sample %s %s; scored %g", self.name, sid, msg,
                               self.failure_score)
                logged += 1
        if failures + timeouts > logged:
            logger.warning("reward %s: %d more failed samples in this batch not logged",
                           self.name, failures + timeouts - logged)
        return RewardBatch(scores, extras, failed,
                           self._metrics(scores, extras, failed, failures, timeouts, latency))

    def score(self, samples: Sequence[Mapping]) -> RewardBatch:
        """Synchronous :meth:`ascore` (must not be called from inside a running event loop)."""
        return asyncio.run(self.ascore(samples))

    @staticmethod
    def _metrics(scores, extras, failed, failures, timeouts, latency) -> dict[str, float]:
        n = len(scores)
        if n == 0:
            return {"reward/failures": 0.0, "reward/timeouts": 0.0}
        mean = sum(scores) / n
        metrics = {
            "reward/mean": mean,
            "reward/std": math.sqrt(sum((s - mean) ** 2 for s in scores) / n),
            "reward/min": min(scores),
            "reward/max": max(scores),
            "reward/failures": float(failures),
            "reward/timeouts": float(timeouts),
            "reward/failure_rate": (failures + timeouts) / n,
            "reward/latency_s": latency / n,
        }
        sums: dict[str, list[float]] = {}
        for extra, bad in zip(extras, failed):
            if bad:
                continue
            for key, val in extra.items():
                if isinstance(val, numbers.Real) and math.isfinite(float(val)):
                    name = key if "/" in key else (f"reward/extra/{key}" if key in _RESERVED
                                                   else f"reward/{key}")
                    sums.setdefault(name, []).append(float(val))
        for name, vals in sums.items():
            metrics[name] = sum(vals) / len(vals)
        return metrics
