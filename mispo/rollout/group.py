"""Rollout workers as Ray actors: split requests over them, broadcast weights, survive crashes.

    group = RolloutGroup(model_dir, recipe.rollout, dtype="float32", seed=0,
                         tensor_parallel=recipe.resources.rollout_tensor_parallel,
                         expert_parallel=recipe.resources.rollout_expert_parallel)
    samples = group.generate(requests, n=8, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=step)
    group.sync([put_bucket(b) for b in policy.weight_buckets(bytes)], version=step)  # mispo.weights.transport
    group.sync_broadcast(lambda g: policy_group.submit(PolicyWorker.broadcast_weights, g), version=step)  # or broadcast
    group.shutdown()

Requests are split into contiguous chunks, one per worker, and the Samples come back in request
order. Fault tolerance: actors are created with `max_restarts` (Ray restarts a dead actor, which
reloads the checkpoint at `model_path`) and `max_task_retries=0` (Ray must not retry on a fresh
actor that still has the initial weights). When a call fails because its actor died, the group
waits for the restart, re-syncs it with the latest bucket refs and version it keeps (holding the
refs keeps the buckets in the object store), logs a warning, and retries that chunk.

Broadcast sync (`sync_broadcast`, `mispo.weights.broadcast`): learner rank 0 broadcasts the buckets to
every engine's vLLM workers over a sync group whose TCPStore this group hosts; formed on first use,
kept between syncs. A restarted worker is not in it: the group re-syncs that worker from the object
store (learner rank 0 also puts what it broadcast there, and this group keeps that ref) and re-forms
the group, with every worker, at the next sync. A sync that a worker's death breaks is retried on a
new group once the worker is back; every worker then loads the whole version again.
"""

from __future__ import annotations

import logging
import time

from mispo.batch import Sample
from mispo.config import RolloutConfig
from mispo.infra.call_timeout import CallTimedOut, CallTimeouts
from mispo.rollout.vllm_engine import RolloutWorker

log = logging.getLogger("mispo.rollout")


def split(n: int, k: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [start, end) chunks of range(n) for k workers (empty ones dropped)."""
    size, rest = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        end = start + size + (i < rest)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


class RolloutGroup:
    """`rollout_cfg.num_workers` RolloutWorker actors (num_cpus=0; an engine's GPUs each on a GPU cluster)."""

    def __init__(self, model_path: str, rollout_cfg: RolloutConfig, dtype: str = "float32", seed: int = 0,
                 max_retries: int = 3, restart_timeout_s: float = 300.0,
                 options: list[dict] | None = None, tensor_parallel: int = 1, expert_parallel: bool = False,
                 cpu_cores: list[list[int]] | None = None, fp32_lm_head: bool = False,
                 timeouts: CallTimeouts | None = None):
        """`options`: Ray `.options(...)` per worker (mispo.infra.placement bundles on a GPU cluster); None: no
        CPU reservation and `tensor_parallel` GPUs per worker when the cluster has GPUs.
        `tensor_parallel` / `expert_parallel`: each engine's vLLM tensor_parallel_size and
        enable_expert_parallel (`resources.rollout_tensor_parallel` / `rollout_expert_parallel`; 1 / False
        on CPU). `cpu_cores`: the cores each worker is pinned to (a CPU run's `cpu_split`), None = not pinned.
        `fp32_lm_head`: the engines' lm_head in fp32 (`model.fp32_lm_head`). `timeouts`: how long a generation or
        a weight load may take before the worker is stopped as hung and recovered as from its death."""
        import ray

        if not ray.is_initialized():
            ray.init()
        if options is None:
            gpus = tensor_parallel if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            options = [{"num_cpus": 0, "num_gpus": gpus}] * rollout_cfg.num_workers
        actor = ray.remote(max_restarts=-1, max_task_retries=0)(RolloutWorker)
        config = rollout_cfg.model_dump()
        self.workers = [actor.options(**options[rank]).remote(str(model_path), config, dtype, seed + rank,
                                                              tensor_parallel, expert_parallel,
                                                              cpu_cores[rank] if cpu_cores else None,
                                                              fp32_lm_head)
                        for rank in range(rollout_cfg.num_workers)]
        self.max_retries, self.restart_timeout_s = max_retries, restart_timeout_s
        self.timeouts = timeouts or CallTimeouts()
        self.tensor_parallel = tensor_parallel
        self.buckets: list = []  # latest weights (ObjectRefs, or a ref to their list); [] = model_path's
        self.version = 0
        self._rendezvous = None  # broadcast sync: the TCPStore its groups meet at, and the current group
        self._group: dict | None = None
        ray.get([w.ping.remote() for w in self.workers])  # engines up (or their errors) before returning

    # ------------------------------------------------------------------ rollouts
    def generate(self, requests: list[dict], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int | None = None) -> list[Sample]:
        """RolloutWorker.generate over all workers; Samples in request order (n per request)."""
        return self._map(RolloutWorker.generate, requests, n=n, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed)

    def generate_episodes(self, requests: list[dict], env_spec: str, n: int, temperature: float, top_p: float,
                          max_new_tokens: int, max_turns: int, seed: int | None = None,
                          max_episode_tokens: int | None = None) -> list[Sample]:
        """RolloutWorker.generate_episodes over all workers (env_spec: an absolute path or a module);
        `max_new_tokens` per model turn, `max_episode_tokens` per episode (model + environment tokens)."""
        return self._map(RolloutWorker.generate_episodes, requests, env_spec=env_spec, n=n, temperature=temperature,
                         top_p=top_p, max_new_tokens=max_new_tokens, max_turns=max_turns, seed=seed,
                         max_episode_tokens=max_episode_tokens)

    def _map(self, method, requests: list[dict], **kwargs) -> list[Sample]:
        """`method` (a RolloutWorker method, by reference) over the workers, each its share of the requests;
        a worker that dies is restarted, re-synced and given its share again (up to max_retries)."""
        import ray

        method = method.__name__

        chunks = split(len(requests), len(self.workers))
        calls = {i: getattr(self.workers[i], method).remote(requests[a:b], **kwargs)
                 for i, (a, b) in enumerate(chunks)}
        results: dict[int, list[Sample]] = {}
        attempts = dict.fromkeys(calls, 0)
        while calls:
            for i, ref in list(calls.items()):
                try:
                    results[i] = self.timeouts.wait(ref, f"RolloutWorker.{method}",
                                                    lambda seconds: self._stop_hung(i, method, seconds))
                    del calls[i]
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, CallTimedOut) as exc:
                    attempts[i] += 1
                    if attempts[i] > self.max_retries:
                        raise RuntimeError(f"rollout worker {i} died {attempts[i]} times; giving up") from exc
                    log.warning("rollout worker %d died during %s (%s); restarting it, re-syncing weights "
                                "version %d and retrying its %d requests", i, method, type(exc).__name__,
                                self.version, chunks[i][1] - chunks[i][0])
                    self._recover(i)
                    a, b = chunks[i]
                    calls[i] = getattr(self.workers[i], method).remote(requests[a:b], **kwargs)
        return [s for i in sorted(results) for s in results[i]]

    # ------------------------------------------------------------------ weights
    def sync(self, buckets: list, version: int) -> float:
        """Load `buckets` into every worker; returns the slowest worker's seconds. Items are ObjectRefs
        (best made by `mispo.weights.transport.put_bucket`) or lists of (name, tensor), which are put here; the
        refs are kept for crash recovery until the next sync."""
        import ray

        from mispo.weights.transport import put_bucket

        self.buckets = [b if isinstance(b, ray.ObjectRef) else put_bucket(b) for b in buckets]
        self.version = int(version)
        calls = {i: w.update_weights.remote(self.buckets, self.version) for i, w in enumerate(self.workers)}
        seconds = 0.0
        for i, ref in calls.items():
            try:
                seconds = max(seconds, self.timeouts.wait(ref, "RolloutWorker.update_weights",
                                                          lambda limit: self._stop_hung(i, "update_weights", limit)))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, CallTimedOut) as exc:
                log.warning("rollout worker %d failed during weight sync (%s); restarting and re-syncing", i,
                            type(exc).__name__)
                self._recover(i)
        return seconds

    def sync_broadcast(self, send, version: int, backend: str = "gloo") -> float:
        """Load the learner's weights into every worker by broadcast (module docstring); returns the
        slowest worker's seconds. `send(group)` starts the learners' side on every rank
        (`PolicyWorker.broadcast_weights`) and returns their ObjectRefs, rank 0's first; its answer (the
        same buckets in the object store) is kept for crash recovery until the next sync. `backend`:
        "nccl" (GPU workers) or "gloo"."""
        import ray

        for attempt in range(self.max_retries + 1):
            group = self._sync_group(backend)
            calls = {i: w.receive_weights.remote(group, 1 + i * self.tensor_parallel, version)
                     for i, w in enumerate(self.workers)}
            sent = send(group)
            seconds, dead, errors = 0.0, [], []
            for i, ref in calls.items():  # every member finishes: done, failed, or timed out
                try:
                    seconds = max(seconds, ray.get(ref))
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    dead.append(i)
                except ray.exceptions.RayTaskError as exc:
                    errors.append(exc)
            if not dead and not errors:  # all loaded (rank 0's object-store copy may still be on its way)
                self.buckets, self.version = sent[0], int(version)
                return seconds
            for ref in reversed(sent):  # the learners' side has ended too before anything is retried
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    errors.insert(0, exc)  # a learner's error first: it is the likelier cause
            if not dead:  # nobody died: a real error (a learner's, or a worker's load)
                raise errors[0]
            log.warning("rollout worker(s) %s died during weight broadcast (attempt %d); restarting them and "
                        "broadcasting version %d again on a new group", dead, attempt + 1, version)
            self._group = None
            for i in dead:
                self._await_restart(i)
        raise RuntimeError(f"weight broadcast failed {self.max_retries + 1} times: rollout workers kept dying")

    def _sync_group(self, backend: str) -> dict:
        """The current sync group (learner rank 0 + every vLLM worker), formed if there is none."""
        if self._group is None or self._group["backend"] != backend:
            import ray

            from mispo.weights.broadcast import Rendezvous, broadcast_members

            if self._rendezvous is None:
                self._rendezvous = Rendezvous(ray.util.get_node_ip_address())  # the driver's node IP: multi-node
            self._group = self._rendezvous.group(1 + len(self.workers) * self.tensor_parallel, backend,
                                                 broadcast_members(len(self.workers), self.tensor_parallel))
        return self._group

    def _stop_hung(self, i: int, method: str, seconds: float) -> None:
        """Worker i did not answer `method` within `seconds`: kill its process (Ray starts it again) and raise
        CallTimedOut, which the callers recover from as from a death."""
        import ray

        log.warning("rollout worker %d did not answer %s within %.0f s; stopping it as hung", i, method, seconds)
        ray.kill(self.workers[i], no_restart=False)
        raise CallTimedOut("RolloutWorker", method, seconds) from None

    def _await_restart(self, i: int) -> None:
        """Wait until Ray has restarted worker i (up to restart_timeout_s)."""
        import ray

        worker, deadline = self.workers[i], time.monotonic() + self.restart_timeout_s
        while True:
            try:
                ray.get(worker.ping.remote())
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _recover(self, i: int) -> None:
        """Wait until Ray has restarted worker i, then give it the latest weights from the object store (after
        a broadcast sync: what learner rank 0 put there; the sync group is re-formed at the next sync)."""
        import ray

        self._await_restart(i)
        self._group = None  # a broadcast group does not hold the restarted worker: re-formed at the next sync
        buckets = ray.get(self.buckets) if isinstance(self.buckets, ray.ObjectRef) else self.buckets
        if buckets:
            ray.get(self.workers[i].update_weights.remote(buckets, self.version))

    def probe_logprobs(self, sequences: list[list[int]]) -> list[list[list[float]]]:
        """Every worker's `RolloutWorker.probe_logprobs` of the same sequences (the sync probe)."""
        import ray

        return ray.get([w.probe_logprobs.remote(sequences) for w in self.workers])

    def versions(self) -> list[int]:
        import ray

        return ray.get([w.version.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        self._group = self._rendezvous = None

    def __len__(self) -> int:
        return len(self.workers)
