"""One learner role (policy or critic) as N data-parallel ranks: Ray actors of one worker class that
join one torch.distributed group (gloo on CPU, NCCL on GPU) for DeepSpeed.

    policy = LearnerGroup(PolicyWorker, options, model_path, **kwargs)   # options: one dict per rank
    refs   = policy.submit(PolicyWorker.compute_logprobs, ray.put(batch))   # every rank, the whole batch
    logp   = merge_row_results(ray.get(refs))      # each rank filled its own rows: summed
    policy.all(PolicyWorker.save, directory, "state")        # collectives: every rank, wait for all
    refs   = policy.first(PolicyWorker.weight_bucket_refs)    # every rank runs it; rank 0's answer
    policy.rank0(PolicyWorker.keep_version, step, keep)      # a @rank0_only method: rank 0 alone

Methods are passed by reference, never by name: a renamed method fails in the driver, where the tests that
import the module see it, not inside a Ray actor. Who runs a method is declared once, on the method: every
rank, unless it is marked `@rank0_only` (then only `rank0` may call it, and `rank0` only such methods).

The rendezvous is rank 0's address and a free port on its node: on a CPU run (no placement) every rank
is pinned to the driver's node and they meet on the loopback, as does a single rank without placement;
placed ranks meet at rank 0's node address and port, read by a probe task in rank 0's bundle.
"""

from __future__ import annotations

from typing import Callable

import ray

from mispo.infra.call_timeout import CallTimedOut, CallTimeouts
from mispo.infra.cluster import free_port


def rank0_only(method: Callable) -> Callable:
    """Mark a learner method that runs on rank 0 alone (no collective): `LearnerGroup.rank0` calls it."""
    method.rank0_only = True
    return method


@ray.remote(num_cpus=0)
def _address_and_port() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port()


def _cpu_options(world_size: int) -> list[dict]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return [{"num_cpus": 0, "scheduling_strategy": here} for _ in range(world_size)]


class LearnerGroup:
    """The ranks of one learner role. `options[i]` are rank i's Ray actor options (its placement bundle
    on a GPU run); `cpu_ranks` ranks on the driver's node when `options` is None."""

    def __init__(self, worker_cls, options: list[dict] | None, *args, cpu_ranks: int = 1, **kwargs):
        if options is None:  # a CPU run: every rank on this node, meeting on the loopback
            options, address, port = _cpu_options(cpu_ranks), "127.0.0.1", free_port()
        elif "scheduling_strategy" in options[0]:  # placed ranks meet at rank 0's node
            probe = _address_and_port.options(scheduling_strategy=options[0]["scheduling_strategy"])
            address, port = ray.get(probe.remote())
        elif len(options) == 1:  # one unplaced rank meets only itself
            address, port = "127.0.0.1", free_port()
        else:
            raise ValueError("several learner ranks need placement options (a scheduling_strategy each)")
        self.world_size, self.worker_cls, self.timeouts = len(options), worker_cls, CallTimeouts()
        self.workers = [ray.remote(worker_cls).options(**o).remote(
            *args, rank=rank, world_size=self.world_size, master_addr=address, master_port=port, **kwargs)
            for rank, o in enumerate(options)]

    def submit(self, method: Callable, *args) -> list:
        """Start `method` (e.g. PolicyWorker.train) on every rank; the ObjectRefs of their answers."""
        name = self._name(method, rank0=False)
        return [getattr(w, name).remote(*args) for w in self.workers]

    def share(self, value):
        """`value` put once where every rank reads it (the Ray object store); pass the result to `submit`."""
        return ray.put(value)

    def all(self, method: Callable, *args) -> list:
        """Every rank's answer (a collective method: all ranks take part)."""
        return self.wait(self.submit(method, *args), method)

    def first(self, method: Callable, *args):
        """Rank 0's answer, after every rank has run `method`."""
        return self.all(method, *args)[0]

    def rank0(self, method: Callable, *args):
        """A `@rank0_only` method on rank 0 alone (not a collective: the other ranks are not involved)."""
        return self.wait([getattr(self.workers[0], self._name(method, rank0=True)).remote(*args)], method)[0]

    def wait(self, refs: list, method: Callable) -> list:
        """The answers of a `submit(method, ...)`, within the call's time limit (`self.timeouts`, set by the
        trainer from trainer.call_timeout_s); past it the group's ranks are stopped and CallTimedOut raised."""
        role = self.worker_cls.__name__

        def hung(seconds: float):
            self.kill()
            raise CallTimedOut(role, method.__name__, seconds) from None

        return self.timeouts.wait(refs, f"{role}.{method.__name__}", hung)

    def _name(self, method: Callable, rank0: bool) -> str:
        """The name of `method`, checked: a method of this group's worker class, run by the right ranks."""
        cls = self.worker_cls.__name__
        if isinstance(method, str):
            raise TypeError(f"learner methods are called by reference ({cls}.{method}), not by name")
        name = getattr(method, "__name__", "")
        if getattr(self.worker_cls, name, None) is not method:
            raise TypeError(f"{getattr(method, '__qualname__', method)} is not a method of {cls}")
        if getattr(method, "rank0_only", False) != rank0:
            raise TypeError(f"{cls}.{name} is {'not ' if rank0 else ''}a @rank0_only method; call it with "
                            f"LearnerGroup.{'submit / all / first' if rank0 else 'rank0'}")
        return name

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)
