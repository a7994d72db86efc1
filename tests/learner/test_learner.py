"""The learners on real DeepSpeed (CPU, gloo): packed log-probs and values equal unpacked forwards,
and an update moves the policy toward advantaged tokens."""

import pytest
import torch

from mispo.algorithms import compute_gae
from mispo.batch import RolloutBatch, Sample
from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
from mispo.learner.packing import pack_samples

pytest.importorskip("deepspeed")


def make_samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        p = torch.randint(7, 90, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(7, 90, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        samples.append(Sample(prompt_ids=p, response_ids=r, rollout_logprobs=[0.0] * len(r), loss_mask=[1] * len(r),
                              finish_reason="length" if i % 3 == 0 else "stop", group=i // 2, reward=float(i % 2)))
    return samples


def test_packing_keeps_budget_and_order():
    samples = make_samples(8)
    mbs = pack_samples(samples, list(range(8)), max_tokens=25)
    assert [r for mb in mbs for r in mb.rows] == list(range(8))
    for mb in mbs:
        lens = [len(samples[r].prompt_ids) + len(samples[r].response_ids) for r in mb.rows]
        assert mb.num_tokens == sum(lens) and (mb.num_tokens <= 25 or len(mb.rows) == 1)
        assert mb.position_ids[0, mb.starts[-1]] == 0


@pytest.fixture(scope="module")
def workers(tiny_checkpoint):
    from mispo.learner.critic_worker import CriticWorker
    from mispo.learner.policy_worker import PolicyWorker

    learner = LearnerConfig(zero_stage=2, micro_batch_tokens=40, actor_mini_batches=2, critic_mini_batches=2,
                            actor=OptimConfig(lr=1e-3, warmup_steps=0), critic=OptimConfig(lr=1e-3, warmup_steps=0))
    model, algo = ModelConfig(), AlgorithmConfig()
    policy = PolicyWorker(str(tiny_checkpoint), model.model_dump(), learner.model_dump(), algo.model_dump(),
                          max_new_tokens=8, master_port=29731)
    critic = CriticWorker(str(tiny_checkpoint), model.model_dump(), learner.model_dump(), algo.model_dump(),
                          master_port=29731)
    return policy, critic


@pytest.mark.slow  # starts DeepSpeed engines
def test_packed_logprobs_equal_unpacked_forward(workers):
    policy, _ = workers
    samples = make_samples()
    batch = RolloutBatch.from_samples(samples)
    logp = policy.compute_logprobs(batch)["old_logprobs"]
    model = policy.engine.module
    for i, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(s.prompt_ids)
        expect = torch.stack([lp[p + t - 1, tok] for t, tok in enumerate(s.response_ids)])
        torch.testing.assert_close(logp[i, : len(s.response_ids)], expect, atol=1e-5, rtol=1e-5)
        assert torch.all(logp[i, len(s.response_ids):] == 0)


@pytest.mark.slow  # starts DeepSpeed engines
def test_values_are_read_before_each_response_token_and_at_the_end(workers):
    """With a non-zero value head, V(s_t) of response token t is the head at position p + t - 1 (the
    prefix before it) and V(s_T) the head at the last token, each as an unpacked forward computes it."""
    _, critic = workers
    samples = make_samples()
    batch = RolloutBatch.from_samples(samples)
    module = critic.engine.module
    head = module.value_head
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():  # restored below: the optimizer's master copy still holds `saved`
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
            head.bias.fill_(0.25)
        got = critic.compute_values(batch)
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            with torch.no_grad():
                h = module.backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float()
                v = h @ head.weight[0].float() + head.bias[0].float()  # [len(ids)]: V after each token
            p, n = len(s.prompt_ids), len(s.response_ids)
            torch.testing.assert_close(got["values"][i, :n], v[p - 1: p + n - 1], atol=1e-5, rtol=1e-5)
            assert torch.all(got["values"][i, n:] == 0)
            torch.testing.assert_close(got["bootstrap_values"][i], v[p + n - 1], atol=1e-5, rtol=1e-5)
        assert got["values"][batch.response_mask.bool()].abs().min() > 0  # the check can tell positions apart
    finally:
        with torch.no_grad():
            head.load_state_dict(saved)


@pytest.mark.slow  # starts DeepSpeed engines
def test_train_step_raises_logprob_of_advantaged_tokens(workers):
    policy, critic = workers
    samples = make_samples()
    batch = RolloutBatch.from_samples(samples)
    before = policy.compute_logprobs(batch)["old_logprobs"]
    batch.old_logprobs = before
    batch.rollout_logprobs = before.clone()  # on-policy: MIS-PO keeps everything
    values = critic.compute_values(batch)
    batch.values, batch.bootstrap_values = values["values"], values["bootstrap_values"]
    adv = torch.where(batch.rewards[:, None] > 0, 1.0, -1.0) * batch.response_mask
    batch.advantages = adv
    batch.returns = compute_gae(batch.rewards, batch.values, batch.response_mask, truncated=batch.truncated,
                                bootstrap_value=batch.bootstrap_values)[1]
    metrics = policy.train(batch)
    assert metrics["mispo/token_keep_frac"] == pytest.approx(1.0)
    assert metrics["actor/grad_norm"] > 0
    after = policy.compute_logprobs(batch)["old_logprobs"]
    m = batch.response_mask.bool()
    delta, sign = (after - before)[m], adv[m]
    assert delta[sign > 0].mean() > delta[sign < 0].mean() + 1e-3
    cm = critic.train(batch)
    assert "critic/lr" in cm
    new_values = critic.compute_values(batch)["values"]
    err_before = ((batch.values - batch.returns) ** 2)[m].mean()
    err_after = ((new_values - batch.returns) ** 2)[m].mean()
    assert err_after < err_before


@pytest.mark.slow  # starts DeepSpeed engines
def test_weight_buckets_cover_state_dict(workers):
    policy, _ = workers
    buckets = policy.weight_buckets(bucket_bytes=20_000)
    names = [n for b in buckets for n, _ in b]
    assert len(buckets) > 1
    assert set(names) == set(policy.engine.module.state_dict())
    assert any(n.endswith("moe.router_bias") for n in names)


@pytest.mark.slow  # starts DeepSpeed engines (and builds DeepSpeed's CPU Adam op once per machine)
def test_offload_optimizer_runs_zero_offload_and_takes_the_same_step(workers, tiny_checkpoint):
    """resources.offload_optimizer reaches DeepSpeed: ZeRO-Offload (stage 2 kept on one rank, where it would otherwise
    run as stage 0) with DeepSpeed's CPU Adam, and the update equals the plain AdamW one."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from mispo.learner.policy_worker import PolicyWorker

    policy, _ = workers  # the process group is up (the module's workers)
    learner = LearnerConfig(zero_stage=2, micro_batch_tokens=40, actor_mini_batches=1, critic=None,
                            actor=OptimConfig(lr=1e-3, warmup_steps=0))
    model, algo = ModelConfig(), AlgorithmConfig(policy_loss="grpo", advantage="grpo")
    batch = RolloutBatch.from_samples(make_samples())
    batch.advantages = torch.where(batch.rewards[:, None] > 0, 1.0, -1.0) * batch.response_mask
    deltas = []
    for offload in (False, True):
        worker = PolicyWorker(str(tiny_checkpoint), model.model_dump(), learner.model_dump(), algo.model_dump(),
                              max_new_tokens=8, master_port=29731, offload_optimizer=offload)
        assert worker.engine.zero_optimization_stage() == (2 if offload else 0)
        assert (worker.engine.zero_offload_optimizer() is not None) == offload
        assert isinstance(worker.engine.basic_optimizer, DeepSpeedCPUAdam) == offload
        before = {k: v.clone() for k, v in worker.engine.module.state_dict().items()}
        metrics = worker.train(batch)
        assert metrics["actor/grad_norm"] > 0
        after = worker.engine.module.state_dict()
        deltas.append(torch.cat([(after[k].float() - before[k].float()).flatten() for k in sorted(before)]))
    plain, offloaded = deltas
    assert plain.norm() > 0
    torch.testing.assert_close(offloaded, plain, atol=1e-6, rtol=1e-4)
