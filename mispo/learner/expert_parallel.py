"""The policy learner's expert-parallel layout (`learner.expert_parallel: P` on a Step3p5 policy).

With N learner ranks and EP size P (P divides N and the expert count E):
    EP groups        consecutive blocks of P ranks [gP, (g + 1)P): together they hold all E experts,
                     rank r holding block r mod P (`models/step3p5/expert_parallel.py` moves the tokens);
    expert-DP groups the D = N / P ranks with the same block (r mod P): replicas of the same experts.
Everything else (attention, router, shared experts, embeddings) stays in DeepSpeed (ZeRO over all N);
the experts are outside it, so ZeRO-3 never gathers them, and `ShardedExperts` owns their optimizer,
whose states (fp32 masters, Adam moments) are sharded over the expert-DP group: each replica keeps 1/D
of them (optionally in host memory: learner.expert_optimizer_offload), ZeRO-1/2 style.

Per GPU, with P_e = routed parameters / P (bf16): weights 2 P_e + gradients 2 P_e (whole, accumulated over
the micro-batches) + fp32 gradient part 4 P_e / D (at the step) + master and moments 12 P_e / D
(`plan/memory.expert_parallel_state_bytes`; with offload the last two in host memory).

Under ZeRO-3 the policy arrives built partitioned (`engine.partitioned_load`): `ShardedExperts` gathers one
MoE layer's experts at a time, keeps this rank's block and drops the rest, so no rank holds the whole model.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Slice:
    """A rank's part of one expert tensor's n elements, flattened, over the expert-DP group of D ranks: every
    rank owns s = ceil(n / D) positions [d s, (d + 1) s) of the tensor padded to D s (the tail is zero padding:
    the last ranks' parts are shorter, possibly empty)."""

    numel: int  # n
    size: int  # D
    index: int  # d, this rank's place in the expert-DP group

    @property
    def part(self) -> int:  # s
        return -(-self.numel // self.size)

    @property
    def lo(self) -> int:
        return min(self.index * self.part, self.numel)

    @property
    def hi(self) -> int:
        return min((self.index + 1) * self.part, self.numel)

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a flattened whole tensor (a view)."""
        return flat[self.lo:self.hi]


def _gathered(moe: nn.Module):
    """A context in which `moe`'s own parameters are whole: the model was built partitioned under ZeRO-3
    (`engine.partitioned_load`; a collective, every rank enters it), else nothing to do. The layer's
    experts are gathered one layer at a time, and `shard_moe` keeps only this rank's block of them."""
    import contextlib

    params = list(moe.parameters(recurse=False)) + [p for c in moe.children() for p in c.parameters(recurse=False)]
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")])


class ShardedExperts:
    """This rank's routed experts of every MoE layer, their optimizer (AdamW with the actor's settings
    and schedule) sharded over the expert-DP group, gathering and checkpoints.

    Optimizer sharding (ZeRO-1/2 style over the D = N / P replicas of this rank's expert block): each expert
    tensor is flattened and split into D parts (`Slice`); this rank keeps the fp32 master copy and the Adam
    moments of its part only (16 bytes per parameter / D instead of 16; with `offload` in host memory, the
    step on the CPU). At each optimizer step
        reduce_grads   the whole bf16 gradients are summed over the expert-DP group and this rank keeps its
                       part: reduce-scatter on NCCL, all-reduce then slice on gloo (no reduce-scatter);
                       / N makes it the single-rank gradient (module docstring); the whole gradients are freed;
        step           the norm of the whole model (the parts' squares summed over all ranks: every part of
                       every expert has exactly one owner) clips the parts, AdamW steps them, and the updated
                       parts are all-gathered over the expert-DP group into the (bf16) expert weights.
    AdamW and the decoupled weight decay are elementwise, so a part steps exactly as it would inside the whole
    tensor. D = 1: each part is the whole tensor and no collective runs over the expert-DP group (the
    unsharded optimizer exactly; an fp32 weight is its own master, as before)."""

    def __init__(self, model: nn.Module, ep_size: int, rank: int, world_size: int, optim: OptimConfig,
                 device: torch.device, offload: bool = False):
        from mispo.learner.engine import warmup_schedule
        family = family_of(model)
        moes = family.expert_layers(model)
        if not moes:
            raise ValueError(f"learner.expert_parallel = {ep_size} needs a model with routed experts (Step3p5 MoE "
                             "layers); this policy has none; fix: remove learner.expert_parallel")
        with _gathered(moes[0]):
            family.check_expert_parallel(moes[0], ep_size, world_size)
        self.ep_size, self.world_size, self.optim = ep_size, world_size, optim
        self.dp_size, self.dp_index = world_size // ep_size, rank // ep_size
        self.offload = offload
        self.ep_group, self.dp_group = expert_groups(world_size, ep_size, rank)
        names = {m: n for n, m in model.named_modules()}
        self.shards = []
        for m in moes:
            with _gathered(m):  # a partitioned load (ZeRO-3): the layer's experts whole for the moment
                self.shards.append((names[m], family.shard_experts(m, rank % ep_size, ep_size, self.ep_group)))
        params = []
        for _, shard in self.shards:
            for p in shard.parameters():
                p.data = p.data.to(device)
                params.append(p)
        self.slices = {id(p): Slice(p.numel(), self.dp_size, self.dp_index) for p in params}
        self.params = [p for p in params if p.requires_grad]
        self.masters = [self._master(p) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)  # experts are matrices: all decay
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(optim.warmup_steps))
        self.grad_parts: list[torch.Tensor] | None = None

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 master of this rank's part of p, flat (in host memory with offload): p's own storage when
        D = 1 and p is fp32 on the device (no copy), else a copy."""
        part = self.slices[id(p)].of(p.detach().reshape(-1))
        if self.dp_size == 1 and p.dtype == torch.float32 and not self.offload:
            return part
        master = part.float().clone()
        if self.offload:
            master = master.cpu()
            if torch.cuda.is_available():
                master = master.pin_memory()
        return master

    def _owns_storage(self, p: nn.Parameter, master: torch.Tensor) -> bool:
        return master.data_ptr() == p.data_ptr() and master.numel() == p.numel()

    # ------------------------------------------------------------------ update
    def grad_norm_sq(self) -> float:
        """||g_experts||^2 of the reduced gradients (after `reduce_grads`), over all experts of the model."""
        device = self.params[0].device if self.params else torch.device("cpu")  # NCCL reduces CUDA tensors only
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for g in self.grad_parts or ():
            sq += g.detach().double().pow(2).sum().to(device)
        # every part of every expert has one owner: the EP group's ranks hold distinct experts, the expert-DP
        # group's ranks distinct parts of them
        dist.all_reduce(sq, group=self.ep_group if self.dp_size == 1 else None)
        return float(sq)

    def reduce_grads(self) -> None:
        """Every rank's part of every expert gradient becomes the single-rank gradient's: summed over the
        expert-DP group, / N; the whole gradients are freed."""
        nccl = self.dp_size > 1 and dist.get_backend(self.dp_group) == "nccl"
        parts = []
        for p in self.params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = None
            sl = self.slices[id(p)]
            flat = g.reshape(-1)
            if self.dp_size == 1:
                part = flat
            elif nccl:  # reduce-scatter over the padded flat gradient
                if sl.part * sl.size != sl.numel:
                    flat = torch.nn.functional.pad(flat, (0, sl.part * sl.size - sl.numel))
                part = torch.empty(sl.part, dtype=g.dtype, device=g.device)
                dist.reduce_scatter_tensor(part, flat, group=self.dp_group)
                part = part[:sl.hi - sl.lo]
            else:  # gloo has no reduce-scatter
                dist.all_reduce(flat, group=self.dp_group)
                part = sl.of(flat).clone()
            del g, flat
            parts.append(part.div_(self.world_size))
        self.grad_parts = parts

    def step(self, other_norm: float) -> float:
        """Clip by the whole model's norm, AdamW step on this rank's parts, all-gather the updated parts over
        the expert-DP group into the weights; returns that norm."""
        if self.grad_parts is None:
            self.reduce_grads()
        norm = math.sqrt(other_norm ** 2 + self.grad_norm_sq())
        clip = self.optim.grad_clip
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        for master, g in zip(self.masters, self.grad_parts):
            master.grad = (g.float() * scale).to(master.device)
        self.grad_parts = None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                if not self._owns_storage(p, master):
                    self._set_from_parts(p, master)
                p.grad = None
        return norm

    @torch.no_grad()
    def _set_from_parts(self, p: nn.Parameter, part: torch.Tensor) -> None:
        """p := the expert-DP group's parts of it (this rank's is `part`), all-gathered (D = 1: copied)."""
        sl = self.slices[id(p)]
        if self.dp_size == 1:
            p.copy_(part.view_as(p))
            return
        local = torch.zeros(sl.part, dtype=p.dtype, device=p.device)
        local[:sl.hi - sl.lo].copy_(part)
        flat = p.view(-1) if p.is_contiguous() else None
        if dist.get_backend(self.dp_group) == "nccl":
            whole = flat if flat is not None and sl.part * sl.size == sl.numel else \
                torch.empty(sl.part * sl.size, dtype=p.dtype, device=p.device)
            dist.all_gather_into_tensor(whole, local, group=self.dp_group)
        else:
            blocks = [torch.empty_like(local) for _ in range(sl.size)]
            dist.all_gather(blocks, local, group=self.dp_group)
            whole = torch.cat(blocks)
        if whole is not flat:
            p.copy_(whole[:sl.numel].view_as(p))

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
        """This rank's file: its parts of its block's expert weights (the expert-DP group's files together hold
        each block once), fp32 master parts, optimizer and scheduler states. Every rank writes its own."""
        path = self._file(directory, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        params = [self.slices[id(p)].of(p.detach().reshape(-1)).cpu().clone() for _, s in self.shards
                  for p in s.parameters()]
        torch.save({"format": 2, "expert_data_parallel": self.dp_size, "params": params,
                    "masters": [m.detach().cpu() for m in self.masters],
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, path)

    def load(self, directory: str, tag: str) -> None:
        """Restore what `save` wrote (every rank: the weights are all-gathered over the expert-DP group). A file
        of the unsharded format (whole tensors on every replica) is sliced to this rank's parts."""
        path = self._file(directory, tag)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint in {directory}/{tag} was not written with "
                                    f"learner.expert_parallel = {self.ep_size} over {self.world_size} ranks; fix: "
                                    "resume with the layout it was saved with")
        state = torch.load(path, map_location="cpu")
        whole = state.get("format", 1) == 1  # before sharding: whole tensors, the same on every replica
        with torch.no_grad():
            for p, saved in zip((p for _, s in self.shards for p in s.parameters()), state["params"]):
                if whole:
                    p.copy_(saved)
                else:
                    self._set_from_parts(p, saved.to(p.device))
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                if not self._owns_storage(p, m):
                    m.copy_(self._part(p, saved) if whole else saved)
        optimizer = state["optimizer"]
        if whole:
            for i, p in enumerate(self.params):
                for k, v in optimizer["state"].get(i, {}).items():
                    if torch.is_tensor(v) and v.numel() == p.numel() and v.dim() > 0:
                        optimizer["state"][i][k] = self._part(p, v)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])

    def _part(self, p: nn.Parameter, whole: torch.Tensor) -> torch.Tensor:
        return self.slices[id(p)].of(whole.reshape(-1))
