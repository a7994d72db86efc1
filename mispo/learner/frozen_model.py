"""A frozen model for scoring (the policy learner's KL reference, a distillation teacher), sharded like
the actor: under ZeRO-3 a DeepSpeed ZeRO-3 inference engine (`deepspeed.initialize` without an
optimizer: DeepSpeed's ZeRO-Inference), so each of the N ranks holds 1/N of every parameter and a
forward gathers them module by module and frees them after use; at other stages a plain copy. Under
ZeRO-3 the model is built partitioned (transformers' `from_pretrained` inside `deepspeed.zero.Init`,
switched on by a `HfDeepSpeedConfig` for the load only): no rank ever holds the whole model. Buffers
the model creates in fp32 (Step3p5's `router_bias`) stay fp32 as in a plain load, through DeepSpeed's
`data_types.keep_in_fp32_modules` (zero.Init would otherwise make every buffer the model's dtype).

    model = frozen_model(path, "bfloat16", zero_stage=3, device=engine.device)   # every rank
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits     # no grad

Under ZeRO-3 a forward is a collective: every rank must run the same number of forwards (the
`data_parallel` plan gives every rank the same count of micro-batches, padding with weight-0 repeats),
and the process group must be up first (`engine.init_distributed`).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mispo.learner.models import DTYPES, load_policy


def frozen_model(model_path: str, dtype: str, zero_stage: int, device: torch.device | str,
                 attn_backend: str | None = None, moe_backend: str | None = None) -> nn.Module:
    """The model at `model_path` in eval mode, without gradients. `zero_stage` 3: a ZeRO-3 inference
    engine over the process group's ranks (on DeepSpeed's device for this rank, which must be
    `device`, where callers put inputs); any other stage: a whole copy on `device`."""
    if zero_stage != 3:
        module = load_policy(model_path, dtype, attn_backend=attn_backend, moe_backend=moe_backend)
        return module.eval().requires_grad_(False).to(device)
    import deepspeed

    from mispo.learner.engine import partitioned_load

    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed's config check; no training happens
        # every parameter is released after use (DeepSpeed's default keeps those under 1e5 elements whole
        # on every rank once gathered): a rank holds exactly its 1/N of the model between forwards
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == "bfloat16"},
        "data_types": {"keep_in_fp32_modules": [re.escape(name) for name in fp32_buffers(model_path, dtype)]},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    with partitioned_load(model_path, dtype, config):
        module = load_policy(model_path, dtype, attn_backend=attn_backend, moe_backend=moe_backend)
    module.eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    if engine.device != torch.device(device):
        raise ValueError(f"frozen_model: DeepSpeed placed the model on {engine.device}, the caller's inputs go to "
                         f"{device}; fix: pass device=<the learner engine's device>")
    engine.eval()
    return engine


def fp32_buffers(model_path: str, dtype: str) -> list[str]:
    """Names of the buffers the model creates in fp32 when built in `dtype` (on the meta device: no
    memory, no weights read)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=DTYPES[dtype])
    return [name for name, buffer in model.named_buffers() if buffer.dtype == torch.float32]
