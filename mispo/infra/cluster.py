"""Joining or starting the Ray cluster a job runs on, and free ports for learner process groups."""

from __future__ import annotations

import socket
from pathlib import Path


def start_ray(address: str | None = None, log_file: Path | None = None) -> None:
    """Connect to the Ray cluster at `address`, or start a local one (no dashboard); no-op when connected.
    On a machine without CUDA, actors get DS_ACCELERATOR=cpu so DeepSpeed uses its CPU accelerator.
    `log_file` (a quiet run, `mispo.infra.run_log`): every worker of this job writes its stdout and stderr there
    instead of streaming it to the driver, and Ray's driver logger leaves stderr (`quiet_driver` sends it
    to the file); None: everything is printed here, each worker's lines prefixed "(Actor pid=...)"."""
    import ray

    from mispo.infra.accelerator import deepspeed_env
    from mispo.infra.run_log import worker_runtime_env

    if ray.is_initialized():
        return
    env = {"env_vars": deepspeed_env()}
    if log_file is not None:
        quiet = worker_runtime_env(log_file)
        env = {**quiet, "env_vars": {**env["env_vars"], **quiet["env_vars"]}}
    ray.init(address=address, include_dashboard=False, log_to_driver=log_file is None,
             configure_logging=log_file is None, runtime_env=env)


def free_port() -> int:
    """A TCP port that was free a moment ago (for a learner's torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_learner_options() -> dict:
    """Ray options of a stand-alone learner (SFT, distillation): one GPU when the cluster has one, else none."""
    import ray

    return {"num_cpus": 0, "num_gpus": 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0}


def standalone_learner_options() -> list[dict] | None:
    """Per-rank Ray options of a stand-alone learner group (SFT, distillation): one rank on one GPU when the
    cluster has GPUs; None on a CPU cluster, where the group puts `learner.ranks` ranks on this node."""
    options = single_learner_options()
    return [options] if options["num_gpus"] else None
