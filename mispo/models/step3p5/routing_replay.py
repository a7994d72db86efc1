"""Routing replay (R3): the learner routes each token to the experts the rollout engine chose.

MoE routing is discontinuous: a tiny numerical difference between the engine and the trainer can flip a
token's top-K experts and change its log-prob far more than the precision gap itself. Replaying the
engine's selection removes that part of the training-inference mismatch; the routing *weights* are still
the trainer's (w = s[replayed ids] / sum, x scaling factor), so the router keeps its gradient.

    with replay_routing(model, routed):   # routed: [L, num_hidden_layers, K] int, -1 rows = route freely
        logits = model(input_ids, position_ids=...).logits    # a [1, L] packed micro-batch

`routed[t, layer]` are the expert ids vLLM recorded for token t at decoder layer `layer`
(`CompletionOutput.routed_experts`, [seq_len, num_layers, K], with `enable_return_routed_experts`);
dense layers' rows are ignored. Tokens the engine never forwarded (a response's last token) or without
a record (-1) route freely.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn


def check_replayable(model_path: str | Path) -> None:
    """Refuse rollout.routing_replay, before any engine or learner starts, for a checkpoint whose config.json
    is not a Step3p5 model with at least one MoE layer (nothing to replay)."""
    config_file = Path(model_path) / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "step3p5":
        raise ValueError(f"rollout.routing_replay: {config_file} is a {config.get('model_type')!r} model; routing "
                         "replay covers Step3p5 MoE policies; fix: remove rollout.routing_replay")
    from .configuration_step3p5 import Step3p5Config

    if not Step3p5Config.from_pretrained(model_path).moe_layer_ids:
        raise ValueError(f"rollout.routing_replay: {config_file} has no MoE layers (moe_layers_enum is empty), so "
                         "there are no routed experts to replay; fix: remove rollout.routing_replay")


@contextlib.contextmanager
def replay_routing(model: nn.Module, routed: torch.Tensor | None):
    """Within the context, every MoE layer of `model` takes its selection from `routed` ([N, layers, K]
    for the N tokens of the next forwards); None leaves routing alone."""
    from .moe_utils import moe_layers

    layers = moe_layers(model) if routed is not None else []
    if routed is not None and not layers:
        raise ValueError("routing replay (rollout.routing_replay) needs a Step3p5 MoE policy; this model has no "
                         "Step3p5 MoE layers; fix: remove rollout.routing_replay")
    try:
        for moe in layers:
            moe.replay_ids = routed[:, moe.layer_idx]
        yield
    finally:
        for moe in layers:
            moe.replay_ids = None
