"""Fused training kernels for Step3p5: the "fused" attention and experts backends.

    attention.py   sliding-window / full causal attention with GQA and packing: FlashAttention when
                   installed, else compiled FlexAttention with an analytic block-sparse mask
    moe.py         routed experts: sort by expert, grouped GEMMs (torch grouped_mm or Triton),
                   fused weighted + clamped SwiGLU, gather-sum un-permutation; hand-written backward
    triton_moe.py  the Triton kernels (grouped GEMM, SwiGLU fwd/bwd, gather-sum)

`backends._load_fused_kernels()` imports this package and registers `fused_attention` (when HAS_FLEX or
HAS_FLASH) and `fused_experts` as "fused", for `attn_backend` / `moe_backend` = "fused", or "auto" on CUDA.
This package imports only `reference_ops` / `layout`, never `backends`. Importing never fails on a
CPU-only machine: Triton and flash_attn are optional. The plain-torch functions in `reference_ops.py`
stay the CPU fallback and the test oracle.
"""

from __future__ import annotations

from . import triton_moe
from .attention import HAS_FLASH, HAS_FLEX, build_block_mask, flex_attention_forward, fused_attention
from .moe import RoutedExperts, fused_experts

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
