"""Pluggable compute backends for Step3p5's two hot spots: attention and routed experts.

A backend is a plain function registered under a name. The model picks one per call through
`config.attn_backend` / `config.moe_backend` ("auto" = the fused kernels on CUDA when they are
installed, else "torch"). The "torch" functions here are the reference: plain PyTorch, readable,
and the oracle the fused kernels are tested against.

Attention contract
    attn(q, k, v, layout, window, scale) -> out
    q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv), out [B, T, Hq, D].
    Query i sees key j when: j <= i, both are in the same sequence (packing), key j is not
    padding, and (window is None or i - j < window).

Routed-experts contract
    experts(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, limit) -> out
    x [N, H]; topk_ids [N, K] int64; topk_weights [N, K] fp32 (already renormalised and scaled);
    gate_proj/up_proj [E, I, H]; down_proj [E, H, I]; limit: SwiGLU clamp (0 = off).
    out[n] = sum_k topk_weights[n, k] * Expert_{topk_ids[n, k]}(x[n]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class SequenceLayout:
    """Where sequences start and end in a [B, T] batch, computed once per forward.

    position_ids [B, T]: position within its own sequence.
    segment_ids  [B, T] or None: packed batches; tokens attend only within their segment.
    attention_mask [B, T] or None: 1 for real tokens, 0 for padding.
    cu_seqlens [S+1] int32 or None: packed B == 1 batches, boundaries for varlen kernels.
    """

    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    @classmethod
    def build(cls, input_shape: tuple[int, int], device: torch.device,
              attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> "SequenceLayout":
        """Derive the layout. Packed batches are marked by position_ids that restart at 0."""
        batch, length = input_shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(length, device=device).expand(batch, length)
            return cls(position_ids=position_ids, attention_mask=attention_mask)
        starts = position_ids == 0
        starts[:, 0] = True
        n_starts = starts.sum(-1)
        if attention_mask is None and bool((n_starts > 1).any()):
            segment_ids = starts.long().cumsum(-1)
            layout = cls(position_ids=position_ids, segment_ids=segment_ids)
            if batch == 1:
                bounds = torch.nonzero(starts[0]).flatten()
                cu = torch.cat([bounds, torch.tensor([length], device=device)]).to(torch.int32)
                layout.cu_seqlens = cu
                layout.max_seqlen = int((cu[1:] - cu[:-1]).max())
            return layout
        return cls(position_ids=position_ids, attention_mask=attention_mask)


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
    """Import the fused kernels (they register themselves as 'fused'); absent ones are skipped."""
    try:
        from mispo.models.step3p5 import kernels  # noqa: F401
    except ImportError:
        pass


# --------------------------------------------------------------------------- reference attention
def visibility_mask(layout: SequenceLayout, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, T, T]: query i may attend key j (see module docstring).

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


register_attention_backend("torch", torch_attention)
register_experts_backend("torch", torch_experts)
