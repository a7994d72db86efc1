"""The weight broadcast's timeouts name the member at fault (mispo.weights.broadcast): gloo groups of real
processes on CPU where one rank never joins, one joins and never answers, or the sender never sends; each
error names the rank, what it is (learner rank 0 / rollout engine e, vLLM worker w) and what to check.
Timeouts are a few seconds; each case is a handful of spawned processes."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from mispo.weights.broadcast import (BroadcastError, BroadcastTimeout, Rendezvous, broadcast_members,
                                     receive_buckets, send_buckets)

TIMEOUT_S = 3.0
BUCKETS = [[("w", torch.arange(16, dtype=torch.float32))], [("b", torch.ones(3, dtype=torch.bfloat16))]]


def _member(group: dict, rank: int, behaviour: str, out) -> None:
    """One process of the group: 'send' (rank 0), 'receive', 'join_only' (joins, then never takes part)."""
    from mispo.weights.broadcast import BroadcastGroup

    try:
        member = BroadcastGroup(group, rank, "cpu")
        if behaviour == "send":
            send_buckets(member, BUCKETS)
        elif behaviour == "receive":
            for _ in receive_buckets(member):
                pass
        else:
            time.sleep(TIMEOUT_S * 4)  # alive, joined, never answers
            out.put((rank, "slept", None, None))
            return
        out.put((rank, "ok", None, None))
    except BroadcastError as exc:
        out.put((rank, type(exc).__name__, str(exc), exc.ranks))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, type(exc).__name__, str(exc), None))


def run_group(behaviours: dict[int, str], world_size: int, wait_for: list[int]) -> dict[int, tuple]:
    """Start one process per entry of `behaviours` (ranks not listed never start) and collect the answers
    of `wait_for`; the processes are ended by pid when done."""
    rendezvous = Rendezvous("127.0.0.1", timeout_s=TIMEOUT_S)
    group = rendezvous.group(world_size, "gloo", broadcast_members(world_size - 1))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = {r: ctx.Process(target=_member, args=(group, r, b, out), daemon=True) for r, b in behaviours.items()}
    for p in procs.values():
        p.start()
    got: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + 60 + 4 * TIMEOUT_S
        while set(wait_for) - set(got) and time.monotonic() < deadline:
            try:
                rank, kind, message, ranks = out.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            got[rank] = (kind, message, ranks)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(10)
    assert set(wait_for) <= set(got), f"no answer from ranks {set(wait_for) - set(got)}: {got}"
    return got


def test_a_rank_that_never_joins_is_named_by_every_member():
    got = run_group({0: "send", 1: "receive"}, world_size=3, wait_for=[0, 1])
    for rank in (0, 1):
        kind, message, ranks = got[rank]
        assert kind == "BroadcastTimeout", got[rank]
        assert ranks == [2]
        assert "rank 2 (rollout engine 1 (RolloutWorker 1), vLLM worker 0) did not join within 3 s" in message
        assert "127.0.0.1:" in message and "TCPStore" in message  # what to check: the node reaches the store
        assert "rank 0 = learner rank 0" in message  # who did join, with pid and host


def test_a_member_that_joins_and_never_answers_is_named():
    got = run_group({0: "send", 1: "receive", 2: "join_only"}, world_size=3, wait_for=[0])
    kind, message, ranks = got[0]
    assert kind == "BroadcastTimeout", got[0]
    assert ranks == [2], message
    assert "rank 2 (rollout engine 1 (RolloutWorker 1), vLLM worker 0) did not answer" in message
    assert "did not finish within 3 s" in message


def test_receivers_name_a_sender_that_never_sends():
    got = run_group({0: "join_only", 1: "receive", 2: "receive"}, world_size=3, wait_for=[1, 2])
    for rank in (1, 2):
        kind, message, ranks = got[rank]
        assert kind == "BroadcastTimeout", got[rank]
        assert ranks == [0], message
        assert "rank 0 (learner rank 0 (PolicyWorker, the sender)) did not answer" in message


def test_members_and_loopback_checks():
    assert broadcast_members(2, tensor_parallel=2) == [
        "learner rank 0 (PolicyWorker, the sender)",
        "rollout engine 0 (RolloutWorker 0), vLLM worker 0", "rollout engine 0 (RolloutWorker 0), vLLM worker 1",
        "rollout engine 1 (RolloutWorker 1), vLLM worker 0", "rollout engine 1 (RolloutWorker 1), vLLM worker 1"]
    rendezvous = Rendezvous("127.0.0.1", timeout_s=TIMEOUT_S)
    with pytest.raises(ValueError, match="3 ranks given 2 member names"):
        rendezvous.group(3, "gloo", ["a", "b"])
    assert rendezvous.group(2, "gloo")["members"] == broadcast_members(1)
    assert issubclass(BroadcastTimeout, TimeoutError)


def test_loopback_store_is_refused_on_a_multi_node_cluster(monkeypatch):
    import ray

    from mispo.weights import broadcast

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.1"},
                                               {"Alive": True, "NodeManagerAddress": "10.0.0.2"}])
    with pytest.raises(ValueError, match=r"loopback address '127.0.0.1'.*10.0.0.1, 10.0.0.2.*get_node_ip_address"):
        broadcast._check_reachable("127.0.0.1")
    broadcast._check_reachable("10.0.0.1")  # a routable address is fine
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}])
    broadcast._check_reachable("127.0.0.1")  # one local node: loopback is fine
