"""Communication of the policy learner per training step: ZeRO alone against expert parallelism.

Bytes one GPU sends (ring collectives over n ranks: each rank sends (n - 1)/n of the tensor), for the
update's forward + backward over the step's tokens. b = the model's dtype bytes; N = the learner's GPUs;
M = micro-batches per GPU per step; S = optimizer steps per training step (learner.actor_mini_batches);
passes = 2 (forward, backward), 3 with gradient checkpointing (the recomputed forward gathers and
dispatches again).

    zero_bytes(P, N, stage)  stage 3:   M (passes + 1) (N-1)/N P b    an all-gather of every parameter per pass
                                                                      and a gradient reduce-scatter per micro-batch
                             stage 2:   (M + S) (N-1)/N P b          a reduce-scatter per micro-batch, the
                                                                      updated partitions' all-gather per step
                             stage 0/1: S 2 (N-1)/N P b              an all-reduce of the gradients per step
    all_to_all_bytes         passes 2 (EP-1)/EP tokens k h b n_moe
                                         dispatch + combine of each token's top-k copies at every MoE layer
                                         (tokens = the GPU's tokens per step; uniform routing)
    expert_sync_bytes        S 2 (D-1)/D (P_routed / EP) b
                                         the experts' gradients over the expert-data-parallel group D = N / EP:
                                         reduce-scatter, then the updated shard's all-gather

ZeRO-3 alone moves zero_bytes(P) with P = every learner parameter, experts included; EP + ZeRO moves
zero_bytes(P - P_routed) + all_to_all_bytes + expert_sync_bytes.

    forward_zero_bytes       stage 3:   M (N-1)/N P b                 a forward-only pass (pi_old, the
                                                                      reference, the critic's values): one
                                                                      all-gather per micro-batch, no gradients
The step-time model (step_time.py) turns these bytes into seconds at the links' bandwidths.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepTraffic:
    """What one GPU processes per training step."""

    gpus: int  # N
    micro_batches: int  # M
    tokens: int  # this GPU's tokens per step (an upper bound: every sequence at max_model_len)
    optimizer_steps: int  # S
    passes: int  # 2, or 3 with gradient checkpointing
    dtype_bytes: int  # b


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def zero_bytes(params: int, stage: int, t: StepTraffic) -> float:
    """ZeRO's collectives for `params` partitioned (stage >= 1) or replicated over the t.gpus ranks."""
    tensor = _ring(t.gpus) * params * t.dtype_bytes
    if stage == 3:
        return t.micro_batches * (t.passes + 1) * tensor
    if stage == 2:
        return (t.micro_batches + t.optimizer_steps) * tensor
    return t.optimizer_steps * 2 * tensor


def all_to_all_bytes(hidden: int, top_k: int, moe_layers: int, expert_parallel: int, t: StepTraffic) -> float:
    """Dispatch + combine of every token's top-k copies at each MoE layer, each pass."""
    return t.passes * 2 * _ring(expert_parallel) * t.tokens * top_k * hidden * t.dtype_bytes * moe_layers


def expert_sync_bytes(routed: int, expert_parallel: int, t: StepTraffic) -> float:
    """The resident experts' gradient reduce-scatter and updated-shard all-gather over the expert-DP group."""
    return t.optimizer_steps * 2 * _ring(t.gpus // expert_parallel) * routed / expert_parallel * t.dtype_bytes


def forward_zero_bytes(params: int, stage: int, t: StepTraffic) -> float:
    """ZeRO-3's all-gather of every parameter once per micro-batch in a forward-only pass (0 below stage 3)."""
    return t.micro_batches * _ring(t.gpus) * params * t.dtype_bytes if stage == 3 else 0.0
