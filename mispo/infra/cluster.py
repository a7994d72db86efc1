"""Joining or starting the Ray cluster a job runs on, free ports for learner process groups, and the
multi-node check that every node running a role sees the run's folders (shared storage)."""

from __future__ import annotations

import socket
import uuid
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
        s.bind(("", 0))  # every interface: the port is free for a peer on another node too
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


def role_nodes(resources) -> list[dict]:
    """The live Ray nodes other than the driver's that may run one of the run's roles (ray.nodes() entries):
    those holding a resource of `resources.node_resources`, and on a GPU run with a role not pinned, every node
    with GPUs. A CPU run pinning nothing runs on the driver's node alone: []."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    names = set(resources.node_resources.values())
    unpinned_gpu_roles = resources.gpus_per_node > 0 and len(resources.node_resources) < 3
    return [n for n in alive if any(n.get("Resources", {}).get(k, 0) > 0 for k in names)
            or (unpinned_gpu_roles and n.get("Resources", {}).get("GPU", 0) > 0)]


def check_shared_storage(resources, run_dir: Path, paths: list[Path], timeout_s: float = 120) -> None:
    """On a multi-node cluster, every node that may run a role (`role_nodes`) must see the driver's `run_dir`
    (the same folder, not one at the same path: a marker file the driver writes there is read back) and each
    of `paths` (the policy checkpoint the roles load); else RecipeError naming the node, the folder and the
    fix (shared storage). No-op when Ray is not initialised or no other node may run a role."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mispo.config import RecipeError

    if not ray.is_initialized():
        return
    nodes = role_nodes(resources)
    if not nodes:
        return
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = run_dir / f".mispo-shared-{token[:8]}"
    marker.write_text(token)
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        refs = {n["NodeManagerAddress"] + " (node " + n["NodeID"][:8] + ")": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote(
            str(marker), token, [str(Path(p).resolve()) for p in paths]) for n in nodes}
        problems = {}
        for node, ref in refs.items():
            try:
                found = ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                found = [f"no answer within {timeout_s:g} s"]
            if found:
                problems[node] = found
    finally:
        marker.unlink(missing_ok=True)
    if problems:
        where = "; ".join(f"{node}: {', '.join(found)}" for node, found in problems.items())
        raise RecipeError(
            f"a multi-node run needs its folders on storage every node mounts at the same path, but {where} "
            f"(the driver runs on {ray.util.get_node_ip_address()}); fix: put the run folder (--output), the "
            f"model (model.path) and the warm-up cache (MISPO_CACHE) on shared storage (NFS, Lustre, ...) mounted "
            f"at the same path on every node")


def _sees(marker: str, token: str, paths: list[str]) -> list[str]:
    """What this node cannot see of the driver's folders (empty: all of them)."""
    problems = []
    try:
        if Path(marker).read_text() != token:
            problems.append(f"{Path(marker).parent} is another folder than the driver's (not shared)")
    except OSError as exc:
        problems.append(f"cannot read the run folder {Path(marker).parent} ({exc.strerror or exc})")
    problems += [f"{p} is missing" for p in paths if not Path(p).exists()]
    return problems
