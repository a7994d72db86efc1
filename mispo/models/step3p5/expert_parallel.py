"""Expert parallelism for Step3p5's routed experts: experts stay on their rank, tokens move.

An expert-parallel (EP) group of `size` ranks splits the E routed experts of every MoE layer into
`size` contiguous blocks; rank r holds experts [r E/size, (r + 1) E/size). Every rank routes its own
tokens with the full (replicated) router, then

    dispatch: each (token, slot) assignment goes to the rank that holds its expert (all-to-all),
    compute:  that rank runs its local experts on what it received (any routed-experts backend),
    combine:  the outputs come back (all-to-all) and are summed per token with the routing weights,

    out[n] = sum_k w[n, k] * Expert_{ids[n, k]}(x[n])       (the single-rank formula, exactly)

The all-to-alls are autograd-aware (`all_to_all_single_autograd`): their backward is the reverse
all-to-all, so gradients reach the inputs, the routing weights (on the token's own rank) and the
local experts' weights (summed over every rank's tokens). Every rank of the group must run the same
sequence of MoE forwards (the learners' micro-batch plans give every rank the same count).

The local experts' weights live in an `ExpertShard`, a plain object on the MoE module rather than a
registered sub-module, so a data-parallel wrapper (DeepSpeed ZeRO) never sees, partitions or gathers
them; the learner owns their optimizer (`mispo/learner/expert_parallel.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ExpertShard:
    """Rank `rank`'s block of one MoE layer's experts: [E / size, out, in] parameters."""

    gate_proj: nn.Parameter  # [E_local, I, H]
    up_proj: nn.Parameter  # [E_local, I, H]
    down_proj: nn.Parameter  # [E_local, H, I]
    rank: int
    size: int
    group: object = None  # torch.distributed ProcessGroup of the EP ranks (None = the default group)

    @property
    def num_local(self) -> int:
        return self.gate_proj.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        return [self.gate_proj, self.up_proj, self.down_proj]


def check_divides(num_experts: int, ep_size: int, ranks: int) -> None:
    """An EP size must divide the expert count and the learner's ranks (error names the field)."""
    if num_experts % ep_size:
        raise ValueError(f"learner.expert_parallel = {ep_size} does not divide the model's moe_num_experts = "
                         f"{num_experts}; fix: an expert_parallel that divides {num_experts}")
    if ranks % ep_size:
        raise ValueError(f"learner.expert_parallel = {ep_size} does not divide the policy learner's ranks = {ranks}; "
                         "fix: an expert_parallel that divides the ranks (learner.ranks, or resources.actor_gpus)")


def shard_moe(moe: nn.Module, rank: int, size: int, group=None) -> ExpertShard:
    """Replace `moe`'s stacked expert weights (all E experts) by this rank's block, held outside the
    module's registered parameters; returns the shard (also set as `moe.expert_shard`)."""
    e = moe.gate_proj.weight.shape[0]
    n = e // size
    block = slice(rank * n, (rank + 1) * n)
    shard = ExpertShard(*(nn.Parameter(getattr(moe, name).weight.data[block].clone(),
                                       requires_grad=getattr(moe, name).weight.requires_grad)
                          for name in ("gate_proj", "up_proj", "down_proj")), rank=rank, size=size, group=group)
    for name in ("gate_proj", "up_proj", "down_proj"):
        delattr(moe, name)
    moe.expert_shard = shard
    return shard


def expert_parallel_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            shard: ExpertShard, experts_fn, limit: float) -> torch.Tensor:
    """Routed experts over the EP group: x [N, H], topk_ids / topk_weights [N, K] -> out [N, H]."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    n_tokens, top_k = topk_ids.shape
    n_local = shard.num_local
    flat_ids = topk_ids.reshape(-1)
    dest = torch.div(flat_ids, n_local, rounding_mode="floor")
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=shard.size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=shard.group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    token_of = order // top_k
    local_ids = flat_ids[order] - dest[order] * n_local
    recv_ids = torch.empty(sum(recv), dtype=local_ids.dtype, device=x.device)
    dist.all_to_all_single(recv_ids, local_ids, recv, send, group=shard.group)
    group = shard.group if shard.group is not None else dist.group.WORLD
    recv_x = _wait(all_to_all_single_autograd(x[token_of], recv, send, group))
    ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=x.device)
    y = experts_fn(recv_x, recv_ids[:, None], ones, shard.gate_proj, shard.up_proj, shard.down_proj, limit)
    back = _wait(all_to_all_single_autograd(y, send, recv, group))
    w = topk_weights.reshape(-1)[order].to(back.dtype)
    return torch.zeros_like(x).index_add(0, token_of, back * w[:, None])


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    """Functional collectives return an async tensor; wait for it before use."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return tensor.wait() if isinstance(tensor, AsyncCollectiveTensor) else tensor
