"""LoRA adapters (peft) on the policy; the rollout engines and the final checkpoint get MERGED weights.

    model = apply_lora(load_policy(path), {"r": 8, "alpha": 16})   # only the LoRA matrices train
    state = merged_state_dict(model)                             # release names, W + scale * B @ A
    export_merged(model, "out/")                                 # plain checkpoint: from_pretrained, vLLM

Targets are nn.Linear (or transformers Conv1D) modules only. In Step3p5 the defaults are the attention
projections (q/k/v/o and the head-wise gate g_proj) and the dense / shared-expert MLP linears
(gate/up/down_proj). The routed experts are stacked 3-D parameters, not Linear modules, so a name such as
`gate_proj` never reaches them; the MoE router (`moe.gate`) and the MTP layers (not run by the policy's
forward) are never adapted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from mispo.families import family_of

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj")


def target_module_names(model: nn.Module, targets: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Full names of the Linear / Conv1D modules whose last name component (or full name) is in
    `targets` (None: DEFAULT_TARGETS), leaving out what the model's family excludes (MoE routers, Step3p5's
    MTP layers)."""
    targets = set(targets or DEFAULT_TARGETS)
    excluded = family_of(model).lora_excluded(model)
    names = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in excluded
             and (name in targets or name.rsplit(".", 1)[-1] in targets)]
    if not names:
        raise ValueError(f"LoRA: no Linear module of {type(model).__name__} matches target_modules {sorted(targets)}")
    return names


def apply_lora(model: nn.Module, cfg: dict) -> PeftModel:
    """Wrap a causal LM with peft LoRA adapters; only the LoRA matrices are trainable afterwards.

    cfg: the `model.lora` recipe section: r, alpha, dropout, target_modules (None = DEFAULT_TARGETS,
    resolved to Linear modules only, see `target_module_names`). The adapters start at B = 0, so the
    wrapped model computes exactly what the base model did until the first update.
    """
    config = LoraConfig(r=cfg.get("r", 8), lora_alpha=cfg.get("alpha", 16), lora_dropout=cfg.get("dropout", 0.0),
                        target_modules=target_module_names(model, cfg.get("target_modules")), bias="none")
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
    return get_peft_model(model, config)


def base_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's full state dict with every active LoRA delta merged in (W + scale * B @ A).

    Keys are the base model's own (release names: `model.layers.0.self_attn.q_proj.weight`, buffers such
    as `router_bias` included); adapter tensors are left out. The live model is not modified: merged
    weights are new tensors (same dtype and device as W), every other entry is the detached original.
    A model without LoRA layers gives its plain state dict. Under ZeRO-3 gather the parameters first.
    """
    base = base_model(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue  # adapter tensors (lora_A / lora_B / ...)
        state[key.replace(".base_layer.", ".")] = tensor.detach()  # a LoRA layer keeps W in its base_layer
    for name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer) or layer.merged or layer.disable_adapters:
            continue  # not adapted, already merged into W, or switched off
        key = f"{name}.weight"
        weight = state[key]
        delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
        state[key] = (weight.float() + delta).to(weight.dtype)
    return state


def export_merged(model: nn.Module, directory: str | Path) -> Path:
    """Write a plain Hugging Face / release-format checkpoint (config + safetensors) of the merged model:
    no adapter files, loadable by `AutoModelForCausalLM.from_pretrained` and by vLLM."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_model(model).save_pretrained(directory, state_dict=merged_state_dict(model))
    return directory
