"""MoE helpers the trainer needs: EP-group balance loss, loss-free router-bias update, router freezing,
routing statistics. They read the routing each MoE layer keeps from its last forward (`last_routing`).
"""

from __future__ import annotations

import torch
from torch import nn

from .modeling_step3p5 import Routing, Step3p5MoE


def moe_layers(model: nn.Module) -> list[Step3p5MoE]:
    return [m for m in model.modules() if isinstance(m, Step3p5MoE)]


def selection_indicator(routing: Routing, num_experts: int) -> torch.Tensor:
    """s[t, e] = 1 when expert e is among token t's top-K, as [N, E] float."""
    sel = torch.zeros(routing.topk_ids.shape[0], num_experts, device=routing.topk_ids.device)
    return sel.scatter_(1, routing.topk_ids, 1.0)


def ep_group_balance_loss(routing: Routing, num_groups: int) -> torch.Tensor:
    """L_EP = G * sum_g f_g * p_g over G equal groups of experts (one per expert-parallel rank).

    p_g = sum_{e in g} mean_t p[t, e] with p the scores normalised over all experts (inferred);
    f_g = sum_{e in g} (1 / (T K)) sum_t s[t, e] with s the top-K selection indicator.
    A perfectly balanced router gives 1.0.
    """
    scores = routing.scores
    n_tokens, n_experts = scores.shape
    top_k = routing.topk_ids.shape[1]
    if n_experts % num_groups:
        raise ValueError(f"num_groups = {num_groups} must divide the number of experts {n_experts}")
    probs = scores / scores.sum(-1, keepdim=True)
    p_group = probs.mean(0).view(num_groups, -1).sum(-1)
    f_group = (selection_indicator(routing, n_experts).sum(0) / (n_tokens * top_k)).view(num_groups, -1).sum(-1)
    return num_groups * (f_group.detach() * p_group).sum()


def model_balance_loss(model: nn.Module, num_groups: int | None = None) -> torch.Tensor:
    """Mean EP-group balance loss over the MoE layers of the model's last forward. The groups default to
    the real expert-parallel ranks of a sharded model (`expert_parallel.shard_moe`); unsharded, pass G."""
    layers = moe_layers(model)
    if num_groups is None:
        shards = [m.expert_shard for m in layers if m.expert_shard is not None]
        if not shards:
            raise ValueError("num_groups is needed for a model without expert parallelism (G expert groups)")
        num_groups = shards[0].size
    losses = [ep_group_balance_loss(m.last_routing, num_groups) for m in layers if m.last_routing]
    if not losses:
        raise RuntimeError("no MoE routing recorded: run a forward pass first")
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_load(routing: Routing, num_experts: int) -> torch.Tensor:
    """Fraction of (token, slot) assignments each expert received, [E], sums to 1."""
    counts = torch.bincount(routing.topk_ids.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp(min=1)


@torch.no_grad()
def update_router_bias(model: nn.Module, rate: float, reduce=None) -> None:
    """Loss-free balancing: bias_e += rate * sign(mean_load - load_e), per MoE layer, from its last routing.
    `reduce(load) -> load` combines the loads of data-parallel ranks (e.g. their mean) so that every
    rank moves its biases alike; it is called once per MoE layer on every rank."""
    for m in moe_layers(model):
        if m.last_routing is None:
            continue
        load = expert_load(m.last_routing, m.router_bias.numel()).to(m.router_bias.device)
        if reduce is not None:
            load = reduce(load.float())
        m.router_bias += rate * torch.sign(load.mean() - load)


def freeze_router(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or restart) gradient updates of every router gate; returns how many gates changed."""
    gates = [m.gate.weight for m in moe_layers(model)]
    for w in gates:
        w.requires_grad_(not frozen)
    return len(gates)


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict[str, float]:
    """`moe/routing_confidence`: mean probability mass of the selected experts (scores normalised
    over all experts); `moe/load_max_over_mean`: the busiest expert's load over the mean load,
    averaged over layers; `moe/load_cv`: coefficient of variation of expert load; with routing replay,
    `moe/replay_mismatch`: the fraction of tokens whose own top-K differs from the engine's (layer mean)."""
    conf, peak, cv, replay = [], [], [], []
    for m in moe_layers(model):
        r = m.last_routing
        if r is None:
            continue
        probs = r.scores / r.scores.sum(-1, keepdim=True)
        conf.append(probs.gather(-1, r.topk_ids).sum(-1).mean())
        load = expert_load(r, probs.shape[-1])
        peak.append(load.max() / load.mean())
        cv.append(load.std() / load.mean())
        if r.replay_mismatch is not None:
            replay.append(r.replay_mismatch)
    if not conf:
        return {}
    extra = {"moe/replay_mismatch": sum(replay) / len(replay)} if replay else {}
    return {**extra,
        "moe/routing_confidence": torch.stack(conf).mean().item(),
        "moe/load_max_over_mean": torch.stack(peak).mean().item(),
        "moe/load_cv": torch.stack(cv).mean().item(),
    }


def per_layer_expert_load(model: nn.Module) -> list[list[float]]:
    """Per MoE layer, the load fraction of each expert from the last forward."""
    return [expert_load(m.last_routing, m.router_bias.numel()).tolist()
            for m in moe_layers(model) if m.last_routing is not None]
