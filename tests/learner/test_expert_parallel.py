"""Expert parallelism for Step3p5's routed experts: 2 ranks over gloo, each holding half the experts,
compute what one rank holding all of them computes: outputs, loss, gradients (experts, router and the
rest), router statistics; and on the real stack (DeepSpeed ZeRO-3 + EP, Ray actors) the same pi_old
log-probs, gradient norm and update as one plain rank."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mispo.models.step3p5.expert_parallel import check_divides
from mispo.learner.policy_worker import PolicyWorker


def test_ep_size_must_divide_experts_and_ranks():
    check_divides(8, 2, 4)
    with pytest.raises(ValueError, match="learner.expert_parallel = 3 does not divide the model's moe_num_experts"):
        check_divides(8, 3, 3)
    with pytest.raises(ValueError, match="learner.expert_parallel = 4 does not divide the policy learner's ranks"):
        check_divides(8, 4, 2)


def test_recipe_rejects_an_ep_size_that_does_not_divide_the_ranks():
    from mispo.config import Recipe

    with pytest.raises(ValueError, match=r"learner.expert_parallel = 2 does not divide .* learner.ranks = 3"):
        Recipe(learner={"expert_parallel": 2, "ranks": 3})
    assert Recipe(learner={"expert_parallel": 2, "ranks": 4}).learner.expert_parallel == 2


def _model(seed: int):
    from mispo.models.step3p5 import Step3p5ForCausalLM
    from mispo.models.step3p5.tiny import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(num_hidden_layers=3, hidden_size=32, num_nextn_predict_layers=0)
    config.moe_backend = config.attn_backend = "torch"
    model = Step3p5ForCausalLM(config)
    with torch.no_grad():  # a non-zero router bias, so selection and weights differ
        for m in model.modules():
            if hasattr(m, "router_bias"):
                m.router_bias.normal_(0, 0.1)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ep_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from mispo.learner.expert_parallel import expert_groups
    from mispo.models.step3p5.expert_parallel import shard_moe
    from mispo.models.step3p5.moe_utils import expert_load, model_balance_loss, moe_layers

    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    full, sharded = _model(0), _model(0)
    ep_group, _ = expert_groups(2, 2, rank)
    shards = [(n, shard_moe(m, rank, 2, ep_group)) for n, m in sharded.named_modules() if m in moe_layers(sharded)]
    assert not any("gate_proj" in n or "up_proj" in n or "down_proj" in n for n, _ in sharded.named_parameters()
                   if ".moe." in n)  # the experts are not registered parameters: DeepSpeed cannot see them

    # the unsharded model on the whole batch: loss = mean of the two rows' losses (each rank owns one row)
    (full(ids[:1], labels=ids[:1]).loss + full(ids[1:], labels=ids[1:]).loss).backward()
    out_sharded = sharded(ids[rank:rank + 1], labels=ids[rank:rank + 1])
    out_full = full(ids[rank:rank + 1]).logits.detach()
    out_sharded.loss.backward()
    loads = [expert_load(m.last_routing, 8) for m in moe_layers(sharded)]
    balance = model_balance_loss(sharded).detach()  # G = the real EP groups
    with torch.no_grad():
        full(ids[rank:rank + 1])
        full_loads = [expert_load(m.last_routing, 8) for m in moe_layers(full)]
        full_balance = model_balance_loss(full, num_groups=2)
    g_full, g_shard = _grads(full), _grads(sharded)
    for name, g in g_shard.items():  # non-expert gradients: the sum over ranks is the whole-batch gradient
        dist.all_reduce(g)
    expert_grads = {f"{n}.{w}": getattr(s, w).grad for n, s in shards for w in ("gate_proj", "up_proj", "down_proj")}
    torch.save({"logits": out_sharded.logits.detach(), "logits_full": out_full, "g_full": g_full, "g_shard": g_shard,
                "expert_grads": expert_grads, "loads": loads, "full_loads": full_loads,
                "balance": balance, "full_balance": full_balance}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ep_ranks_match_one_rank(tmp_path):
    from mispo.infra.cluster import free_port

    mp.spawn(_ep_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r, res in enumerate(results):
        torch.testing.assert_close(res["logits"], res["logits_full"], atol=1e-5, rtol=1e-5)
        for a, b in zip(res["loads"], res["full_loads"]):  # router statistics
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(res["balance"], res["full_balance"])
        g_full = res["g_full"]
        experts = ("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight")
        assert set(res["g_shard"]) == {n for n in g_full if not n.endswith(experts)}
        for name, g in res["g_shard"].items():
            torch.testing.assert_close(g, g_full[name], atol=1e-5, rtol=1e-4)
        for name, g in res["expert_grads"].items():  # block r of the whole-batch expert gradient
            whole = g_full[f"{name}.weight"]
            block = whole[r * 4:(r + 1) * 4]
            assert whole.abs().sum() > 0
            torch.testing.assert_close(g, block, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- real stack
def _policy(ckpt, ranks: int, ep: int, zero_stage: int):
    from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
    from mispo.learner.group import LearnerGroup
    from mispo.learner.policy_worker import PolicyWorker

    learner = LearnerConfig(zero_stage=zero_stage, micro_batch_tokens=30, actor_mini_batches=2, expert_parallel=ep,
                            actor=OptimConfig(lr=1e-4, warmup_steps=0))
    return LearnerGroup(PolicyWorker, None, str(ckpt), cpu_ranks=ranks, max_new_tokens=8, seed=3,
                        model=ModelConfig(moe_backend="torch").model_dump(), learner=learner.model_dump(),
                        algorithm=AlgorithmConfig().model_dump())


def _weights(policy) -> dict:
    from mispo.weights.transport import resolve

    return {k: v.clone() for ref in policy.first(PolicyWorker.weight_bucket_refs) for k, v in resolve(ref)}


def _step(policy, batch):
    """pi_old, one update (2 mini-batches), routing statistics and the weight change."""
    import ray

    from mispo.algorithms import mis_filter
    from mispo.learner.data_parallel import merge_row_results
    from mispo.learner.metrics import mean_metrics

    before = _weights(policy)
    logp = merge_row_results(ray.get(policy.submit(PolicyWorker.compute_logprobs, ray.put(batch))))["old_logprobs"]
    batch.old_logprobs = logp
    batch.rollout_logprobs = logp + 0.01 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    batch.advantages = torch.where(batch.rewards[:, None] > 0, 1.0, -1.0) * batch.response_mask
    batch.token_keep, batch.traj_keep = mis_filter(logp, batch.rollout_logprobs, batch.response_mask,
                                                   (0.5, 2.0), (0.9, 1.1))
    metrics = mean_metrics(ray.get(policy.submit(PolicyWorker.train, ray.put(batch))))
    after = _weights(policy)
    return logp, metrics, {k: after[k].float() - before[k].float() for k in after}, before


@pytest.mark.slow  # starts DeepSpeed engines
def test_expert_parallel_zero3_learner_matches_one_plain_rank(ray_cluster, tiny_checkpoint):
    pytest.importorskip("deepspeed")
    from test_learner import make_samples

    from mispo.batch import RolloutBatch

    results = []
    for ranks, ep in ((1, 1), (2, 2)):
        policy = _policy(tiny_checkpoint, ranks, ep, zero_stage=3)
        try:
            results.append(_step(policy, RolloutBatch.from_samples(make_samples(n=10, seed=0))))
        finally:
            policy.kill()
    (logp1, m1, d1, w1), (logp2, m2, d2, w2) = results
    assert set(w2) == set(w1)  # the synced state dict holds every expert, gathered from the EP ranks
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k])
    torch.testing.assert_close(logp2, logp1, atol=1e-5, rtol=1e-5)
    # the gradient norm is scale-sensitive: it catches a wrong expert-gradient scale or a missing part
    assert m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=1e-4)
    experts = [k for k in d1 if k.endswith("moe.gate_proj.weight")]
    assert experts and all(d1[k].norm() > 0 for k in experts)
    delta1 = torch.cat([d1[k].flatten() for k in sorted(d1)])
    delta2 = torch.cat([d2[k].flatten() for k in sorted(d1)])
    assert (delta2 - delta1).norm() / delta1.norm() < 0.02
    for k in experts:  # the experts' own optimizer moved them as DeepSpeed moved them on one rank
        assert (d2[k] - d1[k]).norm() / d1[k].norm() < 0.02
