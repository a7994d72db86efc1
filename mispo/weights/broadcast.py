"""Learner -> rollout weight sync by broadcast over a process group of its own (NCCL on GPUs, gloo on CPU).

    rendezvous = Rendezvous(host)                                    # driver: hosts the groups' TCPStore
    group = rendezvous.group(world_size=1 + engines * tp, backend="gloo")   # a new group: a new name
    sent = send_buckets(join(group, 0, device), buckets)             # learner rank 0: rank 0 of the group
    for bucket in receive_buckets(join(group, rank, device)): ...    # each vLLM worker of each engine

Members: learner rank 0 is rank 0 and the only sender; engine e's vLLM worker w (its rank inside the
engine) is rank 1 + e * tp + w and receives every bucket whole (vLLM's `load_weights` keeps its shard).
The learners' default torch.distributed group (DeepSpeed's) and vLLM's own groups are not touched: a
member connects to the driver's TCPStore, under the group's name, and builds its communicator on it,
gloo: torch's `ProcessGroupGloo`; NCCL: vLLM's `StatelessProcessGroup` + `PyNcclCommunicator` (vLLM's
way to join external trainers and its workers, NCCL variables unpinned as vLLM does). Everything above
`BroadcastGroup.broadcast` is the same code on both backends, so CPU runs test the protocol.

Wire format, per bucket: int64 [header bytes, flat bytes]; the header (UTF-8 JSON of
`transport.flatten`'s metadata [[name, dtype, shape], ...]); the flat uint8 tensor. A header of
0 bytes ends the sync. Buckets stream: neither side needs all of them at once.

A process keeps one group per rendezvous (`join` closes the older one when a new name of the same
rendezvous arrives), so re-forming a group after a crash is a new `Rendezvous.group`.

Timeouts name the member at fault (`BroadcastTimeout`). A group spec lists what each rank is
(`members`: "learner rank 0", "rollout engine 1, vLLM worker 0", ...). Joining: each member writes
`member/<rank>` (itself, pid, host) to the group's store and waits for every rank's key; a rank missing
after `timeout_s` is named, with what to check (the actor alive, its node reaching the driver's TCPStore),
before any communicator is built (NCCL's init has no timeout). Broadcasts: each member counts the ones it
entered in the store (`entered/<rank>`, one store add per broadcast); a broadcast not done within
`timeout_s` (gloo's own timeout; NCCL: the stream polled against a deadline) or failed (a dead peer) is a
`BroadcastTimeout` / `BroadcastError` naming the ranks that never reached it. After an NCCL timeout the
communicator is left as it is: the group is abandoned and re-formed at the next sync.

Multi-node: the driver's store must be reachable from every node, so `Rendezvous` refuses a loopback host
when the Ray cluster has nodes at other addresses (use Ray's node IP of the driver,
`ray.util.get_node_ip_address()`); the store listens on every interface of the driver's machine.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch

from mispo.weights.transport import Bucket, flatten, unflatten

TIMEOUT_S = 600.0  # joining and each broadcast; a member that never joins fails the others after this
_POLL_S = 0.005  # how often an NCCL member looks at its stream while waiting for a broadcast


class BroadcastError(RuntimeError):
    """A weight broadcast that failed; `ranks`: the members named as the cause (those that never reached the
    step that failed), `members`: what each rank of the group is."""

    def __init__(self, message: str, ranks: list[int], members: list[str]):
        super().__init__(message)
        self.ranks, self.members = ranks, members


class BroadcastTimeout(BroadcastError, TimeoutError):
    """A member did not join, or a broadcast was not done, within the group's timeout."""


def broadcast_members(engines: int, tensor_parallel: int = 1) -> list[str]:
    """What each rank of a sync group is: rank 0 = learner rank 0 (the sender), rank 1 + e * tp + w =
    rollout engine e's vLLM worker w (`RolloutGroup` worker e)."""
    return ["learner rank 0 (PolicyWorker, the sender)"] + [
        f"rollout engine {e} (RolloutWorker {e}), vLLM worker {w}"
        for e in range(engines) for w in range(tensor_parallel)]


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _check_reachable(host: str) -> None:
    """A loopback `host` for the driver's store is an error when the Ray cluster this process is connected to
    has nodes at other addresses (they could not reach it)."""
    if not _is_loopback(host):
        return
    try:
        import ray

        if not ray.is_initialized():
            return
        others = sorted({n["NodeManagerAddress"] for n in ray.nodes()
                         if n.get("Alive") and not _is_loopback(n["NodeManagerAddress"])})
    except Exception:  # noqa: BLE001 - no Ray, no cluster to check against
        return
    if others:
        raise ValueError(
            f"weight broadcast rendezvous on the loopback address {host!r}, but the Ray cluster has nodes at "
            f"{', '.join(others)} that could not reach it; fix: host the store at the driver's node IP "
            f"(ray.util.get_node_ip_address()), or start the head node with a routable --node-ip-address")


def sync_backend(resources) -> str | None:
    """`resources.weight_sync` resolved for a run: None = the Ray object store, else the broadcast's
    backend ("nccl" on a GPU run, "gloo" on CPU). auto = broadcast on a multi-node GPU run
    (nodes > 1 and gpus_per_node > 0), the object store otherwise."""
    mode = resources.weight_sync
    if mode == "auto":
        mode = "broadcast" if resources.nodes > 1 and resources.gpus_per_node > 0 else "object_store"
    if mode == "object_store":
        return None
    return "nccl" if resources.gpus_per_node > 0 else "gloo"


class Rendezvous:
    """The driver's TCPStore (on a free port of `host`) where sync groups meet; `group` names a new one.
    Keep it alive while its groups exist (NCCL reads the store when a communicator is made)."""

    def __init__(self, host: str, timeout_s: float = TIMEOUT_S):
        from torch.distributed import TCPStore

        _check_reachable(host)
        self.store = TCPStore(host, 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        self.host, self.port, self.timeout_s, self.count = host, self.store.port, timeout_s, 0

    def group(self, world_size: int, backend: str, members: list[str] | None = None) -> dict:
        """The spec of a new group (a plain dict: it travels to every member). `members`: what each rank is,
        for errors (default `broadcast_members(world_size - 1)`: one vLLM worker per engine)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight broadcast backend {backend!r}: expected 'gloo' or 'nccl'")
        members = list(members) if members is not None else broadcast_members(int(world_size) - 1)
        if len(members) != world_size:
            raise ValueError(f"weight broadcast group of {world_size} ranks given {len(members)} member names")
        self.count += 1
        return {"host": self.host, "port": self.port, "name": f"mispo-weights-{self.port}-{self.count}",
                "world_size": int(world_size), "backend": backend, "timeout_s": self.timeout_s,
                "members": members}


class BroadcastGroup:
    """This process's membership of one group; `broadcast` is in place from rank 0 and blocking."""

    def __init__(self, group: dict, rank: int, device: torch.device | str):
        from torch.distributed import PrefixStore, TCPStore

        if not 0 <= rank < group["world_size"]:
            raise ValueError(f"rank {rank} outside weight broadcast group {group['name']} of "
                             f"{group['world_size']} members")
        self.name, self.rank, self.world_size = group["name"], rank, group["world_size"]
        self.members = list(group.get("members") or broadcast_members(self.world_size - 1))
        self.host, self.port, self.timeout_s = group["host"], group["port"], float(group["timeout_s"])
        self.backend, self.device, self.entered = group["backend"], torch.device(device), 0
        timeout = timedelta(seconds=self.timeout_s)
        try:
            client = TCPStore(self.host, self.port, is_master=False, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - re-raised with what to check
            raise BroadcastError(
                f"weight broadcast group {self.name}: rank {rank} ({self.members[rank]}) on {_here()} could not "
                f"reach the driver's TCPStore at {self.host}:{self.port} ({exc}); check that this node can open "
                f"TCP connections to the driver's node on that port (same network, no firewall), and that the "
                f"driver is still running", [rank], self.members) from exc
        self.store = PrefixStore(group["name"], client)  # the group's keys apart from other groups'
        self._join()
        if self.backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            self._pg = ProcessGroupGloo(self.store, rank, self.world_size, timeout)  # all have joined: quick
        else:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
            from vllm.utils.nccl import unpinned_nccl_env

            if self.device.type != "cuda":
                raise ValueError(f"weight broadcast over NCCL needs a CUDA device, got {self.device}")
            with unpinned_nccl_env():  # the learner does not set vLLM's pinned NCCL variables
                self._comm = PyNcclCommunicator(StatelessProcessGroup(rank, self.world_size, self.store),
                                                self.device)

    def _join(self) -> None:
        """Say who this rank is (`member/<rank>`) and wait until every rank has; a BroadcastTimeout naming the
        ranks still missing after timeout_s."""
        self.store.set(f"member/{self.rank}", f"{self.members[self.rank]}, pid {os.getpid()} on {_here()}")
        keys = [f"member/{r}" for r in range(self.world_size)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))  # one blocking wait on the store's side
            missing = []
        except Exception:  # noqa: BLE001 - torch raises DistStoreError / RuntimeError at the timeout
            missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
        if missing:
            raise BroadcastTimeout(
                f"weight broadcast group {self.name}: {_ranks(missing, self.members)} did not join within "
                f"{self.timeout_s:g} s (rank {self.rank}, {self.members[self.rank]}, waited on {_here()}; "
                f"joined: {self._joined_text(missing)}); check that {'it' if len(missing) == 1 else 'they'} "
                f"did not die or hang before the sync (its Ray actor and the run's log, logs/run.log), and that "
                f"{'its' if len(missing) == 1 else 'their'} node can reach the driver's TCPStore at "
                f"{self.host}:{self.port} (same network, no firewall on that port)", missing, self.members)

    def _joined_text(self, missing: list[int]) -> str:
        joined = [r for r in range(self.world_size) if r not in missing]
        parts = []
        for r in joined:
            try:
                parts.append(f"rank {r} = {self.store.get(f'member/{r}').decode()}")
            except Exception:  # noqa: BLE001 - the store itself failing: just the rank
                parts.append(f"rank {r}")
        return "; ".join(parts) or "none"

    def broadcast(self, tensor: torch.Tensor) -> None:
        """rank 0's `tensor` into every member's `tensor` (same shape and dtype, on `device`); blocks at most
        timeout_s, then raises BroadcastTimeout naming the ranks that never reached this broadcast (a failure
        of the transport, e.g. a dead peer, is a BroadcastError naming them the same way)."""
        self.entered += 1
        self.store.add(f"entered/{self.rank}", 1)
        try:
            if self.backend == "gloo":
                from torch.distributed import BroadcastOptions

                options = BroadcastOptions()
                options.rootRank = 0
                self._pg.broadcast([tensor], options).wait()
            else:
                self._comm.broadcast(tensor, src=0)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                deadline = time.monotonic() + self.timeout_s
                while not done.query():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NCCL broadcast not done within {self.timeout_s:g} s")
                    time.sleep(_POLL_S)
        except Exception as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: Exception) -> BroadcastError:
        """The error of broadcast number `self.entered` failing here: which ranks never entered it."""
        try:
            behind = {r: int(self.store.add(f"entered/{r}", 0)) for r in range(self.world_size)}
        except Exception:  # noqa: BLE001 - the driver's store is gone too
            behind = None
        timed_out = isinstance(exc, TimeoutError) or "timeout" in str(exc).lower() or \
            "timed out" in str(exc).lower()
        what = f"did not finish within {self.timeout_s:g} s" if timed_out else f"failed ({exc})"
        head = (f"weight broadcast group {self.name}: broadcast {self.entered} on rank {self.rank} "
                f"({self.members[self.rank]}, {_here()}) {what}")
        if behind is None:
            return BroadcastError(f"{head}; the driver's TCPStore at {self.host}:{self.port} is unreachable too: "
                                  "check that the driver is still running", [], self.members)
        late = [r for r, n in behind.items() if n < self.entered]
        cls = BroadcastTimeout if timed_out else BroadcastError
        if late:
            stuck = ", ".join(f"rank {r} at {behind[r]}" for r in late)
            return cls(f"{head}: {_ranks(late, self.members)} did not answer (never reached it; broadcasts entered: "
                       f"{stuck}); check that {'it' if len(late) == 1 else 'they'} did not die or hang (its Ray actor "
                       f"and the run's log, logs/run.log; a weight load stuck in vLLM)", late, self.members)
        return cls(f"{head}, although every rank reached it: the transport between the nodes is at fault; check "
                   f"that the nodes reach each other on all ports (gloo and NCCL open their own connections; "
                   f"NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name the interface, NCCL_DEBUG=INFO tells more)",
                   [], self.members)

    def close(self) -> None:
        if self.backend == "nccl" and getattr(self, "_comm", None) is not None:
            self._comm.destroy()
        self._pg = self._comm = None


def _here() -> str:
    return socket.gethostname()


def _ranks(ranks: list[int], members: list[str]) -> str:
    return ", ".join(f"rank {r} ({members[r]})" for r in ranks)


_MEMBERS: dict[tuple, BroadcastGroup] = {}  # this process's group of each rendezvous (host, port)


def join(group: dict, rank: int, device: torch.device | str) -> BroadcastGroup:
    """This process's member of `group`, joined on first use (a collective: every member joins); the
    older group of the same rendezvous, if this process was in one, is closed."""
    key = (group["host"], group["port"])
    member = _MEMBERS.get(key)
    if member is not None and member.name == group["name"]:
        return member
    if member is not None:
        del _MEMBERS[key]
        member.close()
    _MEMBERS[key] = BroadcastGroup(group, rank, device)
    return _MEMBERS[key]


def send_buckets(member: BroadcastGroup, buckets: Iterable[Bucket]) -> int:
    """Rank 0: each bucket (sizes, header, flat bytes), then the end marker; returns the bytes sent."""
    if member.rank != 0:
        raise ValueError(f"send_buckets on rank {member.rank} of {member.name}: only rank 0 sends")
    sent = 0
    for bucket in buckets:
        meta, flat = flatten(bucket)
        header = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        member.broadcast(torch.tensor([header.numel(), flat.numel()], dtype=torch.int64, device=member.device))
        member.broadcast(header.to(member.device))
        member.broadcast(flat.to(member.device))
        sent += flat.numel()
    member.broadcast(torch.zeros(2, dtype=torch.int64, device=member.device))
    return sent


def receive_buckets(member: BroadcastGroup) -> Iterator[Bucket]:
    """Ranks > 0: rank 0's buckets as they arrive ((name, tensor) views into a flat tensor on `device`),
    until the end marker. Consume it to the end, or the sender and the other members wait."""
    while True:
        sizes = torch.empty(2, dtype=torch.int64, device=member.device)
        member.broadcast(sizes)
        header_bytes, flat_bytes = sizes.tolist()
        if header_bytes == 0:
            return
        header = torch.empty(header_bytes, dtype=torch.uint8, device=member.device)
        member.broadcast(header)
        flat = torch.empty(flat_bytes, dtype=torch.uint8, device=member.device)
        member.broadcast(flat)
        yield unflatten(json.loads(header.cpu().numpy().tobytes()), flat)
