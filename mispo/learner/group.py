"""One learner role (policy or critic) as N data-parallel ranks: Ray actors of one worker class that
join one torch.distributed group (gloo on CPU, NCCL on GPU) for DeepSpeed.

    policy = LearnerGroup(PolicyWorker, options, model_path, **kwargs)   # options: one dict per rank
    refs   = policy.submit("compute_logprobs", ray.put(batch))            # every rank, the whole batch
    logp   = merge_row_results(ray.get(refs))      # each rank filled its own rows: summed
    policy.all("save", directory, "state")         # collectives: every rank, wait for all
    refs   = policy.first("weight_bucket_refs")    # every rank runs it; rank 0's answer

The rendezvous is rank 0's address and a free port on its node: on a CPU run (no placement) every rank
is pinned to the driver's node and they meet on the loopback, as does a single rank without placement;
placed ranks meet at rank 0's node address and port, read by a probe task in rank 0's bundle.
"""

from __future__ import annotations

import ray

from mispo.cluster import free_port


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
        self.world_size = len(options)
        self.workers = [ray.remote(worker_cls).options(**o).remote(
            *args, rank=rank, world_size=self.world_size, master_addr=address, master_port=port, **kwargs)
            for rank, o in enumerate(options)]

    def submit(self, method: str, *args) -> list:
        """Start `method` on every rank; the ObjectRefs of their answers."""
        return [getattr(w, method).remote(*args) for w in self.workers]

    def all(self, method: str, *args) -> list:
        """Every rank's answer (a collective method: all ranks take part)."""
        return ray.get(self.submit(method, *args))

    def first(self, method: str, *args):
        """Rank 0's answer, after every rank has run `method`."""
        return self.all(method, *args)[0]

    def rank0(self, method: str, *args):
        """`method` on rank 0 alone (not a collective: the other ranks are not involved)."""
        return ray.get(getattr(self.workers[0], method).remote(*args))

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)
