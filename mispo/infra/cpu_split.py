"""How a CPU run shares the machine's cores between the rollout engines and the learners.

`resources.rollout_cores: k` pins the rollout engines to k cores (split evenly over rollout.num_workers)
and the learners to the others (torch threads = their core count). 0 (the default) decides by mode:
sync shares every core with every role (generation and updates never run at the same time), async
gives the rollouts half the cores, rounded up, so generating the next steps does not thrash the update
running beside it. A machine with one core always shares it.

The split is of the driver's machine, so it applies only where every role runs there: a GPU run, or a run
that places roles on nodes (`resources.node_resources`), is not split (`run_split`): each process uses the
cores of its own node (`pin_process(None)`). A process given cores its node does not have is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mispo.config import RecipeError


@dataclass(frozen=True)
class CoreSplit:
    rollout: list[list[int]] | None  # the cores of each rollout worker; None = not pinned
    learner: list[int] | None  # the cores every learner rank may use; None = not pinned


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def run_split(resources, mode: str, workers: int) -> CoreSplit:
    """The split of a run: none on a GPU run or when `resources.node_resources` places roles on nodes (each
    process then uses its own node's cores), else `split_cores` over this machine's cores."""
    if resources.gpus_per_node or resources.node_resources:
        return CoreSplit(None, None)
    return split_cores(resources.rollout_cores, mode, available_cores(), workers)


def split_cores(rollout_cores: int, mode: str, cores: list[int], workers: int) -> CoreSplit:
    """The split for `rollout_cores` (0 = by mode) over `cores`, with `workers` rollout engines."""
    if rollout_cores == 0:
        if mode == "sync" or len(cores) < 2:
            return CoreSplit(None, None)
        rollout_cores = max(workers, (len(cores) + 1) // 2)
        if rollout_cores >= len(cores):
            return CoreSplit(None, None)  # too few cores to give every engine and the learners their own
    if rollout_cores >= len(cores):
        raise RecipeError(f"resources.rollout_cores = {rollout_cores} leaves no core for the learners: this machine "
                          f"gives the run {len(cores)} ({_ranges(cores)}); fix: at most {len(cores) - 1}, or 0 to "
                          "decide by trainer.mode")
    if rollout_cores < workers:
        raise RecipeError(f"resources.rollout_cores = {rollout_cores} is fewer than rollout.num_workers = {workers}; "
                          "fix: at least one core per rollout worker")
    ours, theirs = cores[:rollout_cores], cores[rollout_cores:]
    bounds = [round(i * rollout_cores / workers) for i in range(workers + 1)]  # near-equal, contiguous
    return CoreSplit([ours[bounds[i]:bounds[i + 1]] for i in range(workers)], theirs)


def pin_process(cores: list[int] | None, sharers: int = 1) -> None:
    """Run this process on `cores` (None: every core it may use) with torch's intra-op threads = those cores
    divided among the `sharers` processes that compute on them at the same time (at least 1).

    Needed even without pinning: Ray starts an actor that asks for no CPUs (num_cpus=0, as every mispo actor
    does) with OMP_NUM_THREADS=1, so torch would run one thread however many cores the run has. A process with a
    GPU is left as it is (its CPU threads do not carry the model's work)."""
    import torch

    if not cores and torch.cuda.is_available():
        return
    if cores:
        here = available_cores()
        if not set(cores) <= set(here):
            import socket

            raise RuntimeError(f"this process on {socket.gethostname()} was given cores {_ranges(cores)} (the "
                               f"driver's core split) but may run on {_ranges(here)}: the split is of the driver's "
                               "machine and this process runs on another node; fix: resources.node_resources for a "
                               "multi-node run (no split), or run every role on the driver's node")
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(max(1, len(cores or available_cores()) // max(1, sharers)))


def _ranges(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)
