"""Plain-torch reference attention and routed experts: readable, the CPU path, and the oracle the fused
kernels are tested against. Registered as backend "torch" by `backends.py`, which states the contracts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _bucket(n: int) -> int:
    """Padded length of a length-n sequence in `segment_attention`: n rounded up to a quarter of its
    power of two (>= 16), so padding wastes at most a third."""
    step = max(16, 1 << max((n - 1).bit_length() - 2, 0))
    return -(-n // step) * step


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      window: int | None, scale: float) -> torch.Tensor:
    """Packed [1, T] attention computed per sequence: the sequences (bounds `cu_seqlens`) are grouped
    by padded length P (`_bucket`), each group scattered into a [S_b, P] batch and attended with one
    causal (+ window) [P, P] mask, and the outputs gathered back. Padding keys sit after every real
    query of their row, so the causal mask hides them."""
    cu = cu_seqlens.to(q.device, torch.long)
    lens = cu[1:] - cu[:-1]
    groups: dict[int, list[int]] = {}
    for s, n in enumerate(lens.tolist()):
        groups.setdefault(_bucket(n), []).append(s)
    out = torch.zeros_like(q)
    for padded, segs in groups.items():
        segs = torch.tensor(segs, device=q.device)
        seg_lens = lens[segs]
        row = torch.repeat_interleave(torch.arange(segs.numel(), device=q.device), seg_lens)
        first = torch.cumsum(seg_lens, 0) - seg_lens
        offset = torch.arange(int(seg_lens.sum()), device=q.device) - torch.repeat_interleave(first, seg_lens)
        token = torch.repeat_interleave(cu[:-1][segs], seg_lens) + offset

        def pad(x: torch.Tensor) -> torch.Tensor:
            buf = x.new_zeros(segs.numel(), padded, *x.shape[2:])
            buf[row, offset] = x[0, token]
            return buf.transpose(1, 2)  # [S_b, H, P, D]

        if window is None or window >= padded:  # plain causal: SDPA's fused kernel, no mask tensor
            mask, causal = None, True
        else:
            i = torch.arange(padded, device=q.device)
            mask, causal = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window), False
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=q.shape[2] != k.shape[2])
        out[0, token] = o.transpose(1, 2)[row, offset]
    return out


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
