"""Plain-torch reference attention and routed experts: readable, the CPU path, and the oracle the fused
kernels are tested against. Registered as backend "torch" by `backends.py`, which states the contracts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mispo.ops.segment_attention import _bucket, segment_attention  # noqa: F401  (the packed path)

from .layout import SequenceLayout


# --------------------------------------------------------------------------- reference attention
def visibility_mask(layout: SequenceLayout, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, T, T]: query i may attend key j (the attention contract in `backends.py`).

    Every query also sees itself, so no row is empty (padding queries' outputs are ignored).
    """
    i = torch.arange(length, device=device)
    allowed = i[None, :] <= i[:, None]  # [T, T] causal
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    allowed = allowed[None]  # [1, T, T]
    if layout.segment_ids is not None:
        seg = layout.segment_ids
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    if layout.attention_mask is not None:
        allowed = allowed & layout.attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout,
                    window: int | None, scale: float) -> torch.Tensor:
    """Reference attention. Packed B == 1 batches go through `segment_attention` when its work
    (sum over length buckets of S_b * P_b^2) is below the full mask's T^2; else `masked_attention`."""
    if layout.cu_seqlens is not None and q.shape[0] == 1:
        lens = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).tolist()
        if sum(_bucket(n) ** 2 for n in lens) < q.shape[1] ** 2:
            return segment_attention(q, k, v, layout.cu_seqlens, window, scale)
    return masked_attention(q, k, v, layout, window, scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout,
                     window: int | None, scale: float) -> torch.Tensor:
    """SDPA with an explicit [B, 1, T, T] visibility mask (GQA via enable_gqa): any layout."""
    length = q.shape[1]
    mask = visibility_mask(layout, length, window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- reference experts
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SwiGLU, clamped when limit > 0: clamp(silu(gate), max=L) * clamp(up, -L, L)."""
    act = F.silu(gate)
    if limit > 0:
        act = act.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return act * up


def torch_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                  limit: float) -> torch.Tensor:
    """Reference routed experts: sort (token, slot) pairs by expert, one matmul per active expert."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=gate_proj.shape[0]).tolist()
    x_sorted = x[token_of]
    w_sorted = topk_weights.reshape(-1)[order].to(x.dtype)
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        xe = x_sorted[rows]
        h = swiglu(xe @ gate_proj[expert].T, xe @ up_proj[expert].T, limit)
        out_sorted[rows] = (h @ down_proj[expert].T) * w_sorted[rows, None]
        start += count
    return torch.zeros_like(x).index_add_(0, token_of, out_sorted)
