"""LearnerGroup calls methods by reference and knows who runs them: a name, a method of another class, or a
rank-0 method called on every rank (or the reverse) is a TypeError in the driver, before Ray sees it."""

import pytest

from mispo.infra.call_timeout import CallTimeouts
from mispo.learner.critic_worker import CriticWorker
from mispo.learner.group import LearnerGroup
from mispo.learner.policy_worker import PolicyWorker


class _Handle:
    """Stands for a Ray actor handle: `handle.method.remote(*args)` records the call."""

    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):
        return type("M", (), {"remote": lambda _, *args: self.calls.append((name, args)) or name})()


def group_of(cls, ranks=2):
    group, calls = LearnerGroup.__new__(LearnerGroup), []
    group.worker_cls, group.world_size, group.workers = cls, ranks, [_Handle(calls) for _ in range(ranks)]
    group.timeouts = CallTimeouts()
    return group, calls


def test_methods_by_reference_fan_out_as_declared(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    group, calls = group_of(PolicyWorker)
    assert group.submit(PolicyWorker.compute_logprobs, "batch") == ["compute_logprobs"] * 2
    assert group.first(PolicyWorker.save, "dir", "state") == "save"  # inherited from LearnerWorker: still its own
    assert group.rank0(PolicyWorker.keep_version, 3, 1) == "keep_version"
    assert calls == [("compute_logprobs", ("batch",))] * 2 + [("save", ("dir", "state"))] * 2 + \
        [("keep_version", (3, 1))]


def test_wrong_calls_fail_in_the_driver():
    group, calls = group_of(PolicyWorker)
    with pytest.raises(TypeError, match=r"by reference \(PolicyWorker.train\)"):
        group.submit("train", "batch")
    with pytest.raises(TypeError, match="CriticWorker.compute_values is not a method of PolicyWorker"):
        group.submit(CriticWorker.compute_values, "batch")
    with pytest.raises(TypeError, match="keep_version is a @rank0_only method"):
        group.all(PolicyWorker.keep_version, 3, 1)
    with pytest.raises(TypeError, match="train is not a @rank0_only method"):
        group.rank0(PolicyWorker.train, "batch")
    assert calls == []
