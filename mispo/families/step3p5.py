"""The Step3p5 family: mispo's own Step 3.5 Flash model (`mispo.models.step3p5`). Its parameter names are the
release checkpoint's, its attention packs sequences itself (attention backends), and its MoE layers record their
routing, which gives routing statistics, loss-free router-bias balancing, routing replay (R3) and expert
parallelism."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mispo.families.base import ModelFamily


class Step3p5Family(ModelFamily):
    name = "step3p5"
    uses_packed_attention = False  # SequenceLayout + its own attention backends

    def __init__(self):
        super().__init__("step3p5")

    def prepare_policy(self, model: nn.Module, attn_backend: str | None, moe_backend: str | None) -> None:
        if attn_backend:
            model.config.attn_backend = attn_backend
        if moe_backend:
            model.config.moe_backend = moe_backend

    def lora_excluded(self, model: nn.Module) -> set[int]:
        """MoE routers and everything inside the MTP layers (not run by the policy's forward)."""
        from mispo.models.step3p5.modeling_step3p5 import Step3p5MoE, Step3p5MTPLayer

        out: set[int] = set()
        for m in model.modules():
            if isinstance(m, Step3p5MoE):
                out.add(id(m.gate))
            elif isinstance(m, Step3p5MTPLayer):
                out.update(id(sub) for sub in m.modules())
        return out

    def expert_layers(self, model: nn.Module) -> list[nn.Module]:
        from mispo.models.step3p5.moe_utils import moe_layers
        return moe_layers(model)

    def check_expert_parallel(self, layer: nn.Module, ep_size: int, ranks: int) -> None:
        from mispo.models.step3p5.expert_parallel import check_divides
        check_divides(layer.gate_proj.weight.shape[0], ep_size, ranks)

    def shard_experts(self, layer: nn.Module, rank: int, size: int, group=None):
        """This rank's block of `layer`'s routed experts (`ExpertShard`), held outside the module's parameters."""
        from mispo.models.step3p5.expert_parallel import shard_moe
        return shard_moe(layer, rank, size, group)

    def is_moe(self, model: nn.Module) -> bool:
        return bool(self.expert_layers(model))

    def freeze_router(self, model: nn.Module) -> int:
        from mispo.models.step3p5.moe_utils import freeze_router
        return freeze_router(model)

    def routing_stats(self, model: nn.Module) -> dict[str, float]:
        from mispo.models.step3p5.moe_utils import routing_stats
        return routing_stats(model)

    def update_router_bias(self, model: nn.Module, rate: float, reduce=None) -> None:
        from mispo.models.step3p5.moe_utils import update_router_bias
        update_router_bias(model, rate, reduce=reduce)

    def replay_routing(self, model: nn.Module, routed: torch.Tensor | None):
        from mispo.models.step3p5.routing_replay import replay_routing
        return replay_routing(model, routed)

    def check_replayable(self, model_path: str | Path) -> None:
        from mispo.models.step3p5.routing_replay import check_replayable
        check_replayable(model_path)
