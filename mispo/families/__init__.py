"""Model families: everything mispo knows about an architecture, in one object per family, looked up by
`model_type`. Generic code (learners, weight sync, LoRA, exports) asks the family and never names a model.

    family = family_of(model)                 # a module, a config, a config dict or a model_type string
    state = family.checkpoint_state(model, model.state_dict())   # checkpoint (vLLM / hub) names
    family.check_learner(config)              # ValueError naming what the learner cannot run

`HFFamily` is any transformers causal LM (dense or MoE: Llama, Qwen2/3, Qwen3-MoE, Mixtral, OLMoE, Gemma,
Phi-3, ...); `Step3p5Family` is mispo's own Step 3.5 Flash model with its MoE hooks (routing statistics,
loss-free router bias, routing replay, expert parallelism).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mispo.families.base import HFFamily, ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(model_type: str, family: ModelFamily) -> None:
    """Make `family` the one for checkpoints of `model_type` (a user may register their own)."""
    _FAMILIES[model_type] = family


def model_type_of(obj) -> str:
    """The model_type of a model, a config, a config dict, a checkpoint directory (a Path) or a model_type
    string."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(json.loads((obj / "config.json").read_text()).get("model_type", ""))
    if isinstance(obj, dict):
        return str(obj.get("model_type", ""))
    while isinstance(getattr(obj, "module", None), torch.nn.Module):  # a DeepSpeed engine: its module
        obj = obj.module
    if hasattr(obj, "get_base_model"):  # a peft model: the family is the base model's
        obj = obj.get_base_model()
    config = getattr(obj, "config", obj)
    return str(getattr(config, "model_type", ""))


def family_of(obj) -> ModelFamily:
    """The family of a model / config / config dict / checkpoint Path / model_type (HFFamily for any type not
    registered)."""
    _register_builtins()
    model_type = model_type_of(obj)
    return _FAMILIES.get(model_type) or HFFamily(model_type)


def replay_routing(model, routed):
    """Context in which `model`'s MoE layers take the engine's expert ids `routed` ([N, layers, K]);
    None (no routing recorded): nothing to do, whatever the family."""
    import contextlib

    return contextlib.nullcontext() if routed is None else family_of(model).replay_routing(model, routed)


def _register_builtins() -> None:
    if "step3p5" not in _FAMILIES:
        from mispo.families.step3p5 import Step3p5Family
        register_family("step3p5", Step3p5Family())


__all__ = ["HFFamily", "ModelFamily", "family_of", "model_type_of", "register_family", "replay_routing"]
