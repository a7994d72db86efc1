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
rendezvous arrives), so re-forming a group after a crash is a new `Rendezvous.group`. A dead member
breaks the group: gloo errors on the next broadcast (or at `timeout_s` if it died before joining);
NCCL has no timeout.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch

from mispo.weights.transport import Bucket, flatten, unflatten

TIMEOUT_S = 600.0  # joining and each broadcast; a member that never joins fails the others after this


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

        self.store = TCPStore(host, 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        self.host, self.port, self.timeout_s, self.count = host, self.store.port, timeout_s, 0

    def group(self, world_size: int, backend: str) -> dict:
        """The spec of a new group (a plain dict: it travels to every member)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight broadcast backend {backend!r}: expected 'gloo' or 'nccl'")
        self.count += 1
        return {"host": self.host, "port": self.port, "name": f"mispo-weights-{self.port}-{self.count}",
                "world_size": int(world_size), "backend": backend, "timeout_s": self.timeout_s}


class BroadcastGroup:
    """This process's membership of one group; `broadcast` is in place from rank 0 and blocking."""

    def __init__(self, group: dict, rank: int, device: torch.device | str):
        from torch.distributed import PrefixStore, TCPStore

        if not 0 <= rank < group["world_size"]:
            raise ValueError(f"rank {rank} outside weight broadcast group {group['name']} of "
                             f"{group['world_size']} members")
        timeout = timedelta(seconds=group["timeout_s"])
        client = TCPStore(group["host"], group["port"], is_master=False, timeout=timeout)
        store = PrefixStore(group["name"], client)  # the group's keys apart from other groups'
        self.name, self.rank, self.world_size = group["name"], rank, group["world_size"]
        self.backend, self.device = group["backend"], torch.device(device)
        if self.backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            self._pg = ProcessGroupGloo(store, rank, self.world_size, timeout)  # returns once all have joined
        else:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
            from vllm.utils.nccl import unpinned_nccl_env

            if self.device.type != "cuda":
                raise ValueError(f"weight broadcast over NCCL needs a CUDA device, got {self.device}")
            with unpinned_nccl_env():  # the learner does not set vLLM's pinned NCCL variables
                self._comm = PyNcclCommunicator(StatelessProcessGroup(rank, self.world_size, store), self.device)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """rank 0's `tensor` into every member's `tensor` (same shape and dtype, on `device`); blocks."""
        if self.backend == "gloo":
            from torch.distributed import BroadcastOptions

            options = BroadcastOptions()
            options.rootRank = 0
            self._pg.broadcast([tensor], options).wait()
        else:
            self._comm.broadcast(tensor, src=0)
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        if self.backend == "nccl":
            self._comm.destroy()
        self._pg = self._comm = None


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
