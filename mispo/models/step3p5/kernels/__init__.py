"""Fused training kernels for Step3p5, registered as the "fused" attention and experts backends.

    attention.py   sliding-window / full causal attention with GQA and packing: FlashAttention when
                   installed, else compiled FlexAttention with an analytic block-sparse mask
    moe.py         routed experts: sort by expert, grouped GEMMs (torch grouped_mm or Triton),
                   fused weighted + clamped SwiGLU, gather-sum un-permutation; hand-written backward
    triton_moe.py  the Triton kernels (grouped GEMM, SwiGLU fwd/bwd, gather-sum)

`backends._load_fused_kernels()` imports this package for `attn_backend` / `moe_backend` = "auto" on CUDA.
Importing never fails on a CPU-only machine: Triton and flash_attn are optional, and only what can run
is registered. The plain-torch functions in `backends.py` stay the CPU fallback and the test oracle.
"""

from __future__ import annotations

from ..backends import register_attention_backend, register_experts_backend
from . import triton_moe
from .attention import HAS_FLASH, HAS_FLEX, build_block_mask, flex_attention_forward, fused_attention
from .moe import RoutedExperts, fused_experts

if HAS_FLEX or HAS_FLASH:
    register_attention_backend("fused", fused_attention)
register_experts_backend("fused", fused_experts)

__all__ = [
    "HAS_FLASH",
    "HAS_FLEX",
    "RoutedExperts",
    "build_block_mask",
    "flex_attention_forward",
    "fused_attention",
    "fused_experts",
    "triton_moe",
]
