"""The family protocol (`ModelFamily`) and the family of every transformers causal LM (`HFFamily`).

Names. transformers 5 may keep a model's tensors in another layout in memory than in its checkpoint: MoE experts
fused (`mlp.experts.gate_up_proj`, [E, 2I, H]) where checkpoints and vLLM have one tensor per expert and
projection (`mlp.experts.3.gate_proj.weight`). `checkpoint_state` applies the conversion `save_pretrained`
applies (`revert_weight_conversion`, the model's own mapping) and drops tied copies, so what a weight sync sends
is exactly what the checkpoint on disk holds, tensor for tensor.

MoE hooks (routing statistics, loss-free router bias, routing replay, expert parallelism) are Step3p5's
(`families/step3p5.py`); an HF MoE gets router freezing and LoRA exclusions from its router modules' names.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

# last name component of an MoE router's Linear in transformers' MoE models (Qwen3-MoE, Mixtral, OLMoE:
# `mlp.gate`; gpt-oss: `mlp.router`)
ROUTER_NAMES = ("gate", "router")


def config_of(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


class ModelFamily:
    """What mispo needs to know about one architecture. Subclasses override what differs."""

    name = "generic"
    uses_packed_attention = True  # the learner attends per packed sequence through `mispo_packed`

    def __init__(self, model_type: str = ""):
        self.model_type = model_type

    # ------------------------------------------------------------------ names
    def checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (the in-memory state dict of `model`, merged LoRA or gathered shards included) under the
        checkpoint's names and layout: transformers' own reverse conversion, tied copies dropped."""
        from transformers.core_model_loading import revert_weight_conversion

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        state = {k: v for k, v in state.items() if k not in self.tied_copies(base)}
        return revert_weight_conversion(base, state) if hasattr(base, "config") else state

    @staticmethod
    def tied_copies(model: nn.Module) -> set[str]:
        """State-dict keys that are copies of another tensor (a tied lm_head): checkpoints leave them out."""
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        return set(tied)

    # ------------------------------------------------------------------ what the learner can run
    def check_learner(self, config) -> None:
        """Raise ValueError naming the feature when the learner cannot train this architecture exactly."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "attention_dropout", 0.0):
            raise ValueError(f"{self.model_type}: attention_dropout = {text.attention_dropout}; the learner's "
                             "packed attention runs no attention dropout (pi_old would not be a deterministic "
                             "forward); fix: set attention_dropout: 0.0 in the checkpoint's config.json")

    def prepare_policy(self, model: nn.Module, attn_backend: str | None, moe_backend: str | None) -> None:
        """Make a freshly loaded policy train on packed micro-batches."""
        from mispo.learner.packed_attention import use_packed_attention

        use_packed_attention(model)

    # ------------------------------------------------------------------ LoRA
    def lora_excluded(self, model: nn.Module) -> set[int]:
        """ids of the modules LoRA must not adapt: MoE routers."""
        return {id(m) for m in self._routers(model)}

    # ------------------------------------------------------------------ MoE
    def _routers(self, model: nn.Module) -> list[nn.Module]:
        """The router Linear of every MoE block: a Linear named `gate` / `router` beside an `experts` module."""
        out = []
        for module in model.modules():
            if not hasattr(module, "experts"):
                continue
            for name in ROUTER_NAMES:
                router = getattr(module, name, None)
                if hasattr(router, "weight"):  # a Linear, or transformers' TopKRouter modules
                    out.append(router)
        return out

    def is_moe(self, model: nn.Module) -> bool:
        return bool(self._routers(model))

    def freeze_router(self, model: nn.Module) -> int:
        """Stop gradient updates of every router; returns how many routers there are (0: a dense model)."""
        routers = self._routers(model)
        for router in routers:
            for p in router.parameters():
                p.requires_grad_(False)
        return len(routers)

    def routing_stats(self, model: nn.Module) -> dict[str, float]:
        """moe/* metrics of the last forward ({} where the family records none)."""
        return {}

    def update_router_bias(self, model: nn.Module, rate: float, reduce=None) -> None:
        """Loss-free balancing step; no-op where the family has no router bias."""

    def replay_routing(self, model: nn.Module, routed: torch.Tensor | None):
        """Context in which MoE layers take the engine's expert ids `routed`; None: routing untouched."""
        if routed is not None:
            raise ValueError(f"routing replay (rollout.routing_replay) covers Step3p5 MoE policies, not "
                             f"{self.model_type!r}; fix: remove rollout.routing_replay")
        return contextlib.nullcontext()

    def check_replayable(self, model_path: str | Path) -> None:
        raise ValueError(f"rollout.routing_replay: {Path(model_path) / 'config.json'} is a {self.model_type!r} "
                         "model; routing replay covers Step3p5 MoE policies; fix: remove rollout.routing_replay")

    def expert_layers(self, model: nn.Module) -> list[nn.Module]:
        """MoE layers that `learner.expert_parallel` can shard ([]: none; the learner then refuses it)."""
        return []

    def check_expert_parallel(self, layer: nn.Module, ep_size: int, ranks: int) -> None:
        raise NotImplementedError

    def shard_experts(self, layer: nn.Module, rank: int, size: int, group=None):
        raise NotImplementedError


class HFFamily(ModelFamily):
    """Any transformers causal LM, dense or MoE, through transformers' own classes and conversions."""

    name = "transformers"
