"""The reward runner: concurrent, time-limited, and a failing plugin never stops the run."""

import asyncio
import logging
import math
import time

import pytest

from mispo.scoring.reward_runner import CombinedReward, RewardRunner, coerce_score


def samples(n, **extra):
    return [{"id": f"s{i}", "prompt": "p", "completion": str(i), **extra} for i in range(n)]


def test_sync_and_async_plugins_with_extras():
    def sync_fn(prompt, completion, **row):
        return {"score": float(completion), "length": len(completion)}

    async def async_fn(prompt, completion, **row):
        await asyncio.sleep(0.01)
        return int(completion)

    for fn in (sync_fn, async_fn):
        out = RewardRunner(fn).score(samples(4))
        assert out.scores == [0.0, 1.0, 2.0, 3.0]
        assert out.failed == [False] * 4
        assert out.metrics["reward/mean"] == 1.5
        assert out.metrics["reward/failures"] == 0 and out.metrics["reward/timeouts"] == 0
    out = RewardRunner(sync_fn).score(samples(2))
    assert out.extras[1] == {"length": 1} and out.metrics["reward/length"] == 1.0


def test_failures_cost_the_sample_only_and_are_logged(caplog):
    def flaky(prompt, completion, **row):
        if completion == "2":
            raise KeyError("answer")
        return 1.0

    with caplog.at_level(logging.WARNING, logger="mispo.scoring.reward_runner"):
        out = RewardRunner(flaky, failure_score=-1.0).score(samples(4))
    assert out.scores == [1.0, 1.0, -1.0, 1.0]
    assert out.failed == [False, False, True, False]
    assert out.metrics["reward/failures"] == 1.0
    assert "s2" in caplog.text and "KeyError" in caplog.text
    assert "KeyError" in out.extras[2]["error"]


@pytest.mark.parametrize("bad, needle", [
    (None, "returned None"), ("1.0", "returned '1.0' (str)"), (float("nan"), "returned nan"),
    ({"value": 1}, "without 'score'"), ({"score": "high"}, "returned {'score': 'high'}"),
    (float("inf"), "finite"),
])
def test_bad_return_values_are_failures(bad, needle, caplog):
    with caplog.at_level(logging.WARNING):
        out = RewardRunner(lambda **kw: bad).score(samples(1))
    assert out.failed == [True] and out.scores == [0.0]
    assert needle in out.extras[0]["error"] and "expected a finite float" in out.extras[0]["error"]
    assert out.metrics["reward/failures"] == 1.0


def test_coerce_accepts_numpy_like_and_bool():
    class Scalar:
        def item(self):
            return 0.75

    assert coerce_score(Scalar()) == (0.75, {})
    assert coerce_score(True) == (1.0, {})


def test_timeouts_sync_and_async():
    async def slow_async(**kw):
        await asyncio.sleep(30)

    def slow_sync(**kw):
        time.sleep(2)
        return 1.0

    for fn in (slow_async, slow_sync):
        start = time.monotonic()
        out = RewardRunner(fn, timeout_s=0.3, failure_score=0.0).score(samples(3))
        assert time.monotonic() - start < 1.5
        assert out.metrics["reward/timeouts"] == 3.0 and out.metrics["reward/failures"] == 0.0
        assert all(out.failed) and "timed out" in out.extras[0]["error"]


def test_runs_concurrently():
    async def wait(**kw):
        await asyncio.sleep(0.2)
        return 1.0

    def wait_sync(**kw):
        time.sleep(0.2)
        return 1.0

    for fn in (wait, wait_sync):
        start = time.monotonic()
        RewardRunner(fn, max_threads=16).score(samples(16))
        assert time.monotonic() - start < 1.0


def test_row_fields_filtered_for_narrow_signatures():
    def narrow(prompt, completion, answer):
        return float(completion == answer)

    out = RewardRunner(narrow).score(samples(2, answer="1", unrelated="x"))
    assert out.scores == [0.0, 1.0]


def test_combined_reward_weights_and_components():
    def fmt(completion, **row):
        return 1.0

    async def acc(completion, **row):
        return {"score": float(completion == "1"), "checked": 1}

    combined = CombinedReward([(fmt, 0.2, "format"), (acc, 1.0, "accuracy")])
    out = RewardRunner(combined).score(samples(2))
    assert out.scores == pytest.approx([0.2, 1.2])
    assert out.extras[1]["reward/format"] == 1.0 and out.extras[1]["reward/accuracy"] == 1.0
    assert out.extras[1]["accuracy/checked"] == 1
    assert out.metrics["reward/accuracy"] == 0.5 and out.metrics["reward/format"] == 1.0

    bad = CombinedReward([(fmt, 1.0, "format"), (lambda **kw: None, 1.0, "broken")])
    out = RewardRunner(bad).score(samples(1))
    assert out.failed == [True] and "component 'broken'" in out.extras[0]["error"]


def test_empty_batch():
    out = RewardRunner(lambda **kw: 1.0).score([])
    assert out.scores == [] and out.metrics["reward/failures"] == 0.0
    assert not math.isnan(out.metrics["reward/timeouts"])
