"""Pluggable compute backends for Step3p5's two hot spots: attention and routed experts.

A backend is a plain function registered under a name. The model picks one per call through
`config.attn_backend` / `config.moe_backend` ("auto" = the fused kernels on CUDA when they are
installed, else "torch"). "torch" is the plain-PyTorch reference (`reference_ops.py`); "fused" is
`kernels/`, imported and registered here on first use. The arrow goes one way: this module imports
`reference_ops` and `kernels`, neither imports this module.

Attention contract
    attn(q, k, v, layout, window, scale) -> out
    q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv), out [B, T, Hq, D]; layout a
    `SequenceLayout` (`layout.py`).
    Query i sees key j when: j <= i, both are in the same sequence (packing), key j is not
    padding, and (window is None or i - j < window).

Routed-experts contract
    experts(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, limit) -> out
    x [N, H]; topk_ids [N, K] int64; topk_weights [N, K] fp32 (already renormalised and scaled);
    gate_proj/up_proj [E, I, H]; down_proj [E, H, I]; limit: SwiGLU clamp (0 = off).
    out[n] = sum_k topk_weights[n, k] * Expert_{topk_ids[n, k]}(x[n]).
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference_ops import torch_attention, torch_experts

AttentionFn = Callable[..., torch.Tensor]
ExpertsFn = Callable[..., torch.Tensor]
_ATTENTION: dict[str, AttentionFn] = {}
_EXPERTS: dict[str, ExpertsFn] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    _ATTENTION[name] = fn


def register_experts_backend(name: str, fn: ExpertsFn) -> None:
    _EXPERTS[name] = fn


def _resolve(table: dict, name: str, kind: str, device: torch.device) -> Callable:
    if name == "auto":
        if device.type == "cuda":
            _load_fused_kernels()
        name = "fused" if device.type == "cuda" and "fused" in table else "torch"
    if name == "fused" and name not in table:
        _load_fused_kernels()
    if name not in table:
        raise ValueError(f"config.{kind}_backend = {name!r} is not registered; known: {sorted(table)} or 'auto'")
    return table[name]


def get_attention_backend(name: str, device: torch.device) -> AttentionFn:
    return _resolve(_ATTENTION, name, "attn", device)


def get_experts_backend(name: str, device: torch.device) -> ExpertsFn:
    return _resolve(_EXPERTS, name, "moe", device)


def _load_fused_kernels() -> None:
    """Register `kernels/` as "fused": the experts always, attention only when flex or flash can run.
    Nothing is registered when the kernels cannot be imported."""
    try:
        from .kernels import HAS_FLASH, HAS_FLEX, fused_attention, fused_experts
    except ImportError:
        return
    if HAS_FLEX or HAS_FLASH:
        register_attention_backend("fused", fused_attention)
    register_experts_backend("fused", fused_experts)


register_attention_backend("torch", torch_attention)
register_experts_backend("torch", torch_experts)
