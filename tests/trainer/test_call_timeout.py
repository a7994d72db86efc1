"""trainer.call_timeout_s: a call's limit is the override, or 10x the slowest call of its kind (at least the
floor); past it the group's processes are stopped and CallTimedOut names the role and the method."""

import pytest

from mispo.infra.call_timeout import CallTimedOut, CallTimeouts
from mispo.loop.dead_actor import role_of, what_died
from mispo.learner.group import LearnerGroup
from mispo.learner.policy_worker import PolicyWorker


def test_limits_learn_from_the_slowest_call_of_each_kind():
    t = CallTimeouts(floor_s=100.0, factor=10.0)
    assert t.limit("PolicyWorker.train") == 100.0  # nothing seen yet: the floor
    t.record("PolicyWorker.train", 30.0)
    t.record("PolicyWorker.train", 12.0)
    assert t.limit("PolicyWorker.train") == 300.0 and t.limit("RolloutWorker.generate") == 100.0
    assert CallTimeouts(override_s=5.0).limit("PolicyWorker.train") == 5.0


def test_a_learner_call_past_its_limit_stops_the_group_and_names_role_and_method(monkeypatch):
    import ray

    def never(refs, timeout=None):
        assert timeout == 7.0
        raise ray.exceptions.GetTimeoutError("timed out")

    monkeypatch.setattr(ray, "get", never)
    group, killed = LearnerGroup.__new__(LearnerGroup), []
    group.worker_cls, group.workers, group.timeouts = PolicyWorker, ["rank0"], CallTimeouts(override_s=7.0)
    group.kill = lambda: killed.append(True)
    with pytest.raises(CallTimedOut) as info:
        group.wait(["ref"], PolicyWorker.train)
    assert killed == [True]
    assert role_of(info.value) == "PolicyWorker"
    assert what_died(info.value) == ("the policy learner hung: PolicyWorker.train did not answer within 7 s "
                                     "(trainer.call_timeout_s); the process was stopped as hung")
