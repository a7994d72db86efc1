"""Data-parallel learner ranks: the plan that shares a batch between ranks (pure, property-tested), and
on the real stack (Ray actors, DeepSpeed on gloo) two ranks compute what one rank computes: the same
pi_old log-probs and values, the same gradient norm and the same weights after an update, at every
ZeRO stage."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.learner.data_parallel import deal_rows, rank_micro_batches
from mispo.learner.packing import pack_rows
from mispo.learner.critic_worker import CriticWorker
from mispo.learner.policy_worker import PolicyWorker

lengths_st = st.lists(st.integers(1, 60), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, world=st.integers(1, 5), max_tokens=st.integers(1, 120))
def test_every_row_once_same_count_within_budget(lengths, world, max_tokens):
    rows = list(range(len(lengths)))
    plans = rank_micro_batches(lengths, rows, world, max_tokens)
    assert len(plans) == world
    assert len({len(p) for p in plans}) == 1  # the same number of micro-batches on every rank
    real = sorted(r for plan in plans for group, padding in plan if not padding for r in group)
    assert real == rows
    for plan in plans:
        for group, padding in plan:
            assert group  # a micro-batch is never empty (padding repeats one row)
            assert padding or sum(lengths[r] for r in group) <= max_tokens or len(group) == 1


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, world=st.integers(1, 5))
def test_dealing_balances_tokens_and_keeps_order(lengths, world):
    rows = list(range(len(lengths)))[::-1]  # any order: each shard keeps it
    shards = deal_rows(lengths, rows, world)
    loads = [sum(lengths[r] for r in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths)
    for s in shards:
        assert s == [r for r in rows if r in s]


@given(lengths=lengths_st, max_tokens=st.integers(1, 120))
def test_one_rank_is_the_plain_packing(lengths, max_tokens):
    rows = list(range(len(lengths)))
    (plan,) = rank_micro_batches(lengths, rows, 1, max_tokens)
    assert [g for g, _ in plan] == pack_rows(lengths, rows, max_tokens)
    assert not any(padding for _, padding in plan)


def test_more_ranks_than_rows_pad_with_weight_zero_repeats():
    plans = rank_micro_batches([5, 7], [0, 1], 3, max_tokens=100)
    assert [len(p) for p in plans] == [1, 1, 1]
    assert plans[0] == [([1], False)] and plans[1] == [([0], False)]
    assert plans[2][0][1] is True


# ---------------------------------------------------------------------------------------- real stack
pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")


def rl_batch(seed=0):
    from test_learner import make_samples

    from mispo.batch import RolloutBatch

    batch = RolloutBatch.from_samples(make_samples(n=10, seed=seed))
    return batch


def groups_for(ckpt, zero_stage, ranks):
    from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
    from mispo.learner.critic_worker import CriticWorker
    from mispo.learner.group import LearnerGroup
    from mispo.learner.policy_worker import PolicyWorker

    learner = LearnerConfig(zero_stage=zero_stage, micro_batch_tokens=30, actor_mini_batches=2, critic_mini_batches=2,
                            actor=OptimConfig(lr=1e-4, warmup_steps=0), critic=OptimConfig(lr=1e-4, warmup_steps=0))
    common = dict(model=ModelConfig().model_dump(), learner=learner.model_dump(),
                  algorithm=AlgorithmConfig().model_dump(), seed=3)
    return (LearnerGroup(PolicyWorker, None, str(ckpt), cpu_ranks=ranks, max_new_tokens=8, **common),
            LearnerGroup(CriticWorker, None, str(ckpt), cpu_ranks=ranks, **common))


def one_step(policy, critic, batch):
    """Forward passes, advantages and one update; returns (logp, values, metrics, weight change)."""
    from mispo.algorithms import compute_gae, mis_filter
    from mispo.learner.data_parallel import merge_row_results
    from mispo.learner.metrics import mean_metrics

    before = weights(policy)
    ref = ray.put(batch)
    logp = merge_row_results(ray.get(policy.submit(PolicyWorker.compute_logprobs, ref)))
    values = merge_row_results(ray.get(critic.submit(CriticWorker.compute_values, ref)))
    batch.old_logprobs = logp["old_logprobs"]
    batch.rollout_logprobs = logp["old_logprobs"] + 0.01 * torch.randn(logp["old_logprobs"].shape,
                                                                       generator=torch.Generator().manual_seed(0))
    batch.values, batch.bootstrap_values = values["values"], values["bootstrap_values"]
    mask = batch.response_mask
    batch.advantages = torch.where(batch.rewards[:, None] > 0, 1.0, -1.0) * mask
    batch.returns = compute_gae(batch.rewards, batch.values, mask, truncated=batch.truncated,
                                bootstrap_value=batch.bootstrap_values)[1]
    batch.token_keep, batch.traj_keep = mis_filter(batch.old_logprobs, batch.rollout_logprobs, mask,
                                                   (0.5, 2.0), (0.9, 1.1))
    ref = ray.put(batch)
    metrics = mean_metrics(ray.get(policy.submit(PolicyWorker.train, ref)))
    metrics.update(mean_metrics(ray.get(critic.submit(CriticWorker.train, ref))))
    after = weights(policy)
    return logp, values, metrics, {k: after[k].float() - before[k].float() for k in after}


def weights(policy) -> dict:
    from mispo.weights.transport import resolve

    return {k: v.clone() for ref in policy.first(PolicyWorker.weight_bucket_refs) for k, v in resolve(ref)}


@pytest.mark.slow  # starts DeepSpeed engines
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_compute_what_one_rank_computes(ray_cluster, tiny_checkpoint, zero_stage):
    results = []
    for ranks in (1, 2):
        policy, critic = groups_for(tiny_checkpoint, zero_stage, ranks)
        try:
            assert policy.world_size == ranks
            results.append(one_step(policy, critic, rl_batch()))
        finally:
            policy.kill()
            critic.kill()
    (logp1, val1, m1, w1), (logp2, val2, m2, w2) = results
    torch.testing.assert_close(logp2["old_logprobs"], logp1["old_logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(val2["values"], val1["values"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(val2["bootstrap_values"], val1["bootstrap_values"], atol=1e-5, rtol=1e-5)
    # the gradient norm is scale-sensitive (Adam's first step is not): it catches a wrong loss scale
    assert m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=1e-4)
    assert m2["mispo/token_keep_frac"] == pytest.approx(m1["mispo/token_keep_frac"], abs=0.15)
    assert set(w2) == set(w1)
    delta1 = torch.cat([w1[k].flatten() for k in sorted(w1)])
    delta2 = torch.cat([w2[k].flatten() for k in sorted(w1)])
    assert delta1.norm() > 0
    # Adam's first step is about lr * sign(g), so where g is ~0 summation order may flip an element:
    # the updates must agree as vectors, not bit for bit
    assert (delta2 - delta1).norm() / delta1.norm() < 0.02
