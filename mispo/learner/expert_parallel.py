"""The policy learner's expert-parallel layout (`learner.expert_parallel: P` on a Step3p5 policy).

With N learner ranks and EP size P (P divides N and the expert count E):
    EP groups        consecutive blocks of P ranks [gP, (g + 1)P): together they hold all E experts,
                     rank r holding block r mod P (`models/step3p5/expert_parallel.py` moves the tokens);
    expert-DP groups the N / P ranks with the same block: replicas of the same experts.
Everything else (attention, router, shared experts, embeddings) stays in DeepSpeed (ZeRO over all N);
the experts are outside it, so ZeRO-3 never gathers them, and `ShardedExperts` owns their optimizer.

Gradient scale: each rank back-propagates N x (its share of the mini-batch loss), DeepSpeed averages
its parameters' gradients over N. An expert's gradient arrives summed over the tokens of every rank of
its EP group; summing it over the expert-DP group covers all N ranks, so g_expert = that sum / N: the
single-rank gradient.

Clipping: DeepSpeed clips its parameters by their own norm ||g_ds|| (its `gradient_clipping`); the
experts are clipped by the whole model's norm sqrt(||g_ds||^2 + ||g_experts||^2), which is what the
learner logs as `actor/grad_norm`. When the whole norm is under the threshold (no clipping) the update
is exactly the single-rank one; above it, the non-expert parameters take a slightly larger step than
joint clipping would give (DeepSpeed exposes its norm only after its step).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mispo.config import OptimConfig
from mispo.families import family_of

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def expert_groups(world_size: int, ep_size: int, rank: int):
    """(this rank's EP group, its expert-data-parallel group); every rank creates every group, in order."""
    ep_group = dp_group = None
    for g in range(world_size // ep_size):
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for j in range(ep_size):
        ranks = list(range(j, world_size, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return ep_group, dp_group


class ShardedExperts:
    """This rank's routed experts of every MoE layer, their optimizer (AdamW with the actor's settings
    and schedule; fp32 master copies when the model is bf16), gathering and checkpoints."""

    def __init__(self, model: nn.Module, ep_size: int, rank: int, world_size: int, optim: OptimConfig,
                 device: torch.device):
        from mispo.learner.engine import warmup_schedule
        family = family_of(model)
        moes = family.expert_layers(model)
        if not moes:
            raise ValueError(f"learner.expert_parallel = {ep_size} needs a model with routed experts (Step3p5 MoE "
                             "layers); this policy has none; fix: remove learner.expert_parallel")
        family.check_expert_parallel(moes[0], ep_size, world_size)
        self.ep_size, self.world_size, self.optim = ep_size, world_size, optim
        self.ep_group, self.dp_group = expert_groups(world_size, ep_size, rank)
        names = {m: n for n, m in model.named_modules()}
        self.shards = [(names[m], family.shard_experts(m, rank % ep_size, ep_size, self.ep_group))
                                                      for m in moes]
        params = []
        for _, shard in self.shards:
            for p in shard.parameters():
                p.data = p.data.to(device)
                params.append(p)
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)  # experts are matrices: all decay
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(optim.warmup_steps))

    # ------------------------------------------------------------------ update
    def grad_norm_sq(self) -> float:
        """||g_experts||^2 of the reduced gradients (after `reduce_grads`), over all experts of the model."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum().cpu()
        dist.all_reduce(sq, group=self.ep_group)  # the EP group's ranks hold distinct experts
        return float(sq)

    def reduce_grads(self) -> None:
        """Every expert gradient becomes the single-rank gradient: sum over the expert-DP group, / N."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.world_size // self.ep_size > 1:
                dist.all_reduce(p.grad, group=self.dp_group)
            p.grad.div_(self.world_size)

    def step(self, other_norm: float) -> float:
        """Clip by the whole model's norm, AdamW step, zero the gradients; returns that norm."""
        norm = math.sqrt(other_norm ** 2 + self.grad_norm_sq())
        clip = self.optim.grad_clip
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        for p, master in zip(self.params, self.masters):
            g = p.grad.float() * scale
            if master is p:
                p.grad = g
            else:
                master.grad = g
                p.grad = None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                if master is not p:
                    p.copy_(master)
                p.grad = None
        return norm

    # ------------------------------------------------------------------ whole tensors
    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Every layer's whole [E, ...] expert tensors under their state-dict names, on CPU, on rank 0 (the
        one that syncs and exports); other ranks get {}. Every rank must call it: rank 0's EP group gathers."""
        rank = dist.get_rank()
        if rank >= self.ep_size:  # not in rank 0's EP group (ranks 0 .. P - 1)
            return {}
        out = {}
        for prefix, shard in self.shards:
            for name in EXPERT_WEIGHTS:
                local = getattr(shard, name).detach().contiguous()
                blocks = [torch.empty_like(local) for _ in range(self.ep_size)] if rank == 0 else None
                dist.gather(local, blocks, dst=0, group=self.ep_group)
                if rank == 0:
                    out[f"{prefix}.{name}.weight"] = torch.cat(blocks).cpu()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _file(self, directory: str, tag: str) -> Path:
        return Path(directory) / tag / f"experts_rank{dist.get_rank():03d}_of{self.world_size}_ep{self.ep_size}.pt"

    def save(self, directory: str, tag: str) -> None:
        path = self._file(directory, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": [p.detach().cpu() for _, s in self.shards for p in s.parameters()],
                    "masters": [m.detach().cpu() for m in self.masters],
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, path)

    def load(self, directory: str, tag: str) -> None:
        path = self._file(directory, tag)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint in {directory}/{tag} was not written with "
                                    f"learner.expert_parallel = {self.ep_size} over {self.world_size} ranks; fix: "
                                    "resume with the layout it was saved with")
        state = torch.load(path, map_location="cpu")
        with torch.no_grad():
            for p, saved in zip((p for _, s in self.shards for p in s.parameters()), state["params"]):
                p.copy_(saved)
            for m, saved in zip(self.masters, state["masters"]):
                m.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
