"""DeepSpeed engines for the learners: process-group set-up and engine construction.

Gradients are accumulated by hand: `backward` on each packed micro-batch (the loss already divided
by the mini-batch's token count), then one `step` per mini-batch, so DeepSpeed's own
gradient_accumulation_steps stays 1.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from mispo.config import OptimConfig


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the learner group's process group (gloo on CPU, nccl on GPU)."""
    from mispo.learner.op_build import prepare_extension_builds

    prepare_extension_builds()  # before DeepSpeed builds its CPU op: own folder, no stale lock
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(0 if not torch.cuda.is_available()
                      else int(os.environ.get("LOCAL_RANK", 0))), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or 1-D tensors). Empty groups are left out
    (DeepSpeed's ZeRO optimizer drops them, which would desynchronise the lr scheduler; LoRA has no
    1-D trainable tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3-partitioned parameter (built under zero.Init) keeps its shape in ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_schedule(warmup_steps: int):
    """The lr factor after s steps: min(1, (s + 1) / (warmup_steps + 1)), linear warm-up to constant."""
    warmup = max(warmup_steps, 0)
    return lambda s: min(1.0, (s + 1) / (warmup + 1))


@contextlib.contextmanager
def partitioned_load(model_path: str, dtype: str, config: dict | None = None):
    """While open, transformers' from_pretrained builds the model inside DeepSpeed's zero.Init (a
    `HfDeepSpeedConfig` for the load only; the actor and `frozen_model` load this way): each rank holds 1/N of
    every parameter as it loads, never the whole model; the fp32 buffers stay fp32. For a ZeRO-3 engine (every
    rank must load: a collective). `config`: the engine's DeepSpeed config (default: a ZeRO-3 one)."""
    import re

    from transformers.integrations import HfDeepSpeedConfig

    from mispo.learner.frozen_model import fp32_buffers

    if config is None:
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "bf16": {"enabled": dtype == "bfloat16"},
                  "data_types": {"keep_in_fp32_modules": [re.escape(n) for n in fp32_buffers(model_path, dtype)]}}
    loading = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        del loading  # later loads in this process are plain again


def deepspeed_stage(zero_stage: int, world_size: int, offload_optimizer: bool = False) -> int:
    """The ZeRO stage the engine runs: `zero_stage`, except that stages 1 and 2 on one data-parallel rank, where
    they partition nothing, run as stage 0: the same AdamW update (fp32 masters in bf16 either way) without ZeRO's
    flat parameter copies and gradient buckets (fp32 medium update in its actor: 0.98 of the isolated update's
    speed against 0.82, benchmarks/learner_profile.py). Kept: stage 3 (its partitioned load and gathers are how a
    model larger than one device's memory is loaded at all) and any stage with `offload_optimizer` (ZeRO-Offload
    needs ZeRO)."""
    return 0 if world_size == 1 and zero_stage in (1, 2) and not offload_optimizer else zero_stage


def build_engine(model: nn.Module, optim: OptimConfig, zero_stage: int, dtype: str, world_size: int = 1,
                 offload_optimizer: bool = False):
    """A DeepSpeed engine with AdamW and linear warm-up to a constant learning rate, ZeRO stage
    `deepspeed_stage(zero_stage, world_size, offload_optimizer)`. `offload_optimizer` (resources.offload_optimizer,
    ZeRO-Offload, stage >= 1): the fp32 master weights, gradients and Adam moments live in host memory and
    DeepSpeed's CPU Adam (AdamW mode) steps them there."""
    import deepspeed

    if offload_optimizer and zero_stage == 0:
        raise ValueError("resources.offload_optimizer (ZeRO-Offload) needs learner.zero_stage >= 1")
    groups = param_groups(model, optim.weight_decay)
    if offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=torch.cuda.is_available())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(optim.warmup_steps))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": deepspeed_stage(zero_stage, world_size, offload_optimizer),
                              **({"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}
                                 if offload_optimizer else {})},
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def accumulate(engine, loss: torch.Tensor, last: bool) -> None:
    """Backward one micro-batch; DeepSpeed reduces and steps only at the mini-batch boundary."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss)


def optimizer_step(engine) -> float | None:
    """`engine.step()` at the mini-batch boundary; returns the gradients' 2-norm before clipping (None when no
    clipping asks for it). DeepSpeed reports that norm itself except in fp32 without ZeRO, where it clips and
    drops it: there the norm of the optimizer's parameters' `.grad` (already averaged over the ranks at the
    boundary) is taken before the step."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        engine.step()
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)
    grads = [p.grad for group in engine.basic_optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads and engine.gradient_clipping() > 0 else None
    engine.step()
    return norm


def full_parameters(module: nn.Module, zero_stage: int):
    """A context in which every parameter is whole: ZeRO-3 gathers the shards (a collective: every rank
    must enter it), other stages hold whole parameters already."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def average_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the learner group's ranks (in place; a collective)."""
    torch.distributed.all_reduce(tensor)
    return tensor.div_(torch.distributed.get_world_size())
