"""The frozen models (the policy learner's KL reference, the distillation teacher) under ZeRO-3 on the
real stack (2 DeepSpeed ranks over gloo as Ray actors): each rank holds half of every parameter, and
their log-probs are the unsharded single copy's (the reference's before and after the actor's update)."""

import pytest
import torch

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

TOKENS, TEMPERATURE = 30, 0.7  # micro-batch budget: several micro-batches per rank, and uneven shares


def sharded_state(group, attribute: str) -> list:
    """On every rank of the group, of its frozen model `attribute`: per parameter (whole elements, this
    rank's partition, elements held whole now, bytes per element), a whole copy's partition being the
    whole; and each buffer's dtype."""
    def state(worker):  # nested, so Ray sends it by value into the actors
        model = getattr(worker, attribute)
        sizes = [(p.ds_numel, p.ds_tensor.numel(), p.numel(), p.ds_tensor.element_size())
                 if hasattr(p, "ds_tensor") else (p.numel(), p.numel(), p.numel(), p.element_size())
                 for p in model.parameters()]
        return sizes, {name.removeprefix("module."): b.dtype for name, b in model.named_buffers()}
    return ray.get([w.__ray_call__.remote(state) for w in group.workers])


def assert_halved(state_per_rank, whole):
    """Every rank holds half of each parameter of the `whole` model, and its buffers in their dtypes."""
    whole_elements = sum(p.numel() for p in whole.parameters())
    for sizes, buffers in state_per_rank:
        assert buffers == {name: b.dtype for name, b in whole.named_buffers()}  # fp32 router biases stay fp32
        assert sum(n for n, _, _, _ in sizes) == whole_elements
        # DeepSpeed pads each parameter to a multiple of the world size, then every rank keeps one part
        assert all(part == (n + 1) // 2 for n, part, _, _ in sizes), "a parameter is not split in two"
        assert sum(now for _, _, now, _ in sizes) == 0, "a gathered parameter was kept whole after the forward"


@pytest.mark.slow  # starts DeepSpeed engines
def test_zero3_reference_and_teacher_hold_half_and_score_like_one_copy(ray_cluster, tiny_checkpoint):
    from test_learner import make_samples

    from mispo.algorithms import mis_filter
    from mispo.batch import RolloutBatch
    from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
    from mispo.learner.data_parallel import merge_row_results, rank_share
    from mispo.learner.frozen_model import frozen_model
    from mispo.learner.group import LearnerGroup
    from mispo.learner.packing import response_logprobs
    from mispo.learner.policy_worker import PolicyWorker
    from mispo.learner.teacher_worker import TeacherWorker

    batch = RolloutBatch.from_samples(make_samples(n=7, seed=1))
    whole = {dtype: frozen_model(str(tiny_checkpoint), dtype, zero_stage=2, device="cpu")  # unsharded copies
             for dtype in ("float32", "bfloat16")}
    want = {"float32": response_logprobs(whole["float32"], batch.samples, TOKENS, "cpu", temperature=TEMPERATURE),
            # bf16 sums depend on the packing: the whole copy runs the ranks' micro-batches
            "bfloat16": sum(response_logprobs(whole["bfloat16"], batch.samples, TOKENS, "cpu",
                                              rank_share(batch.samples, rank, 2, TOKENS), TEMPERATURE)
                            for rank in range(2))}

    learner = LearnerConfig(zero_stage=3, micro_batch_tokens=TOKENS, reference=True, actor_mini_batches=1,
                            actor=OptimConfig(lr=1e-3, warmup_steps=0))
    policy = LearnerGroup(PolicyWorker, None, str(tiny_checkpoint), cpu_ranks=2, model=ModelConfig().model_dump(),
                          learner=learner.model_dump(), algorithm=AlgorithmConfig().model_dump(), max_new_tokens=8,
                          temperature=TEMPERATURE)
    try:
        before = merge_row_results(policy.all(PolicyWorker.compute_logprobs, ray.put(batch)))
        mask = batch.response_mask  # one update moves the actor; the reference stays where it was
        batch.old_logprobs = batch.rollout_logprobs = before["old_logprobs"]
        batch.advantages = torch.where(batch.rewards[:, None] > 0, 1.0, -1.0) * mask
        batch.token_keep, batch.traj_keep = mis_filter(batch.old_logprobs, batch.rollout_logprobs, mask)
        policy.all(PolicyWorker.train, ray.put(batch))
        after = merge_row_results(policy.all(PolicyWorker.compute_logprobs, ray.put(batch)))
        reference_state = sharded_state(policy, "reference")
    finally:
        policy.kill()
    teacher = LearnerGroup(TeacherWorker, None, str(tiny_checkpoint), "bfloat16", cpu_ranks=2,
                           micro_batch_tokens=TOKENS, temperature=TEMPERATURE, zero_stage=3)
    try:
        logp_teacher = sum(teacher.all(TeacherWorker.compute_logprobs, ray.put(batch)))  # each rank filled its own rows
        teacher_state = sharded_state(teacher, "model")
    finally:
        teacher.kill()

    assert want["float32"].abs().sum() > 0
    for logp in (before, after):
        torch.testing.assert_close(logp["ref_logprobs"], want["float32"], atol=1e-5, rtol=1e-5)
    assert (after["old_logprobs"] - before["old_logprobs"]).abs().max() > 1e-3  # the actor did move
    torch.testing.assert_close(logp_teacher, want["bfloat16"], atol=1e-5, rtol=1e-5)
    assert_halved(reference_state, whole["float32"])
    assert_halved(teacher_state, whole["bfloat16"])
