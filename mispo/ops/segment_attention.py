"""Attention over packed sequences, one SDPA per group of similar-length sequences: the plain-torch path of
the learner's packed attention (`mispo.learner.packed_attention`, any transformers model) and of Step3p5's
reference backend (`mispo.models.step3p5.reference_ops`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# PyTorch's CPU flash attention in bf16 / fp16 has a large cost per (sequence, head) block: measured on this
# project's 2-core AMX machine (torch 2.13, forward + backward), blocks shorter than this many positions run
# 1.2-6x faster in fp32 (e.g. 24 x 8 heads x 168 x 64: 42 vs 51 ms; 64 x 4 x 24 x 16: 1.3 vs 8.1 ms), longer
# ones as fast or faster in bf16 (12 x 8 x 256 x 64: 36 vs 36 ms; 8 x 16 x 256 x 128: 88 vs 75 ms).
CPU_FP32_ATTENTION_BELOW = 192


def _bucket(n: int) -> int:
    """Padded length of a length-n sequence in `segment_attention`: n rounded up to a quarter of its
    power of two (>= 16), so padding wastes at most a third."""
    step = max(16, 1 << max((n - 1).bit_length() - 2, 0))
    return -(-n // step) * step


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      window: int | None, scale: float, softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Packed [1, T] attention computed per sequence: the sequences (bounds `cu_seqlens`) are grouped
    by padded length (`_bucket`), each group stacked into a [S_b, P] batch (P = its longest sequence,
    zero-padded at the end) and attended with one causal (+ window) [P, P] mask, and the outputs
    concatenated back in order. Padding keys sit after every real query of their row, so the causal
    mask hides them. Splitting, padding and concatenating are one `torch.cat` each way (no scatter or
    index_put), forward and backward. `softcap` (Gemma 2): scores s = q.k * scale become softcap * tanh(s / softcap)
    before the mask and softmax. `sinks` (gpt-oss, [heads]): one more logit per head joins each softmax
    and takes its share of the mass, attending to nothing. Tokens past cu_seqlens[-1] get zeros. On CPU,
    bf16 / fp16 groups shorter than CPU_FP32_ATTENTION_BELOW attend in fp32 (faster there; output cast back)."""
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    groups: dict[int, list[int]] = {}
    for s, n in enumerate(lens):
        groups.setdefault(_bucket(n), []).append(s)
    pieces = [t[0, bounds[0]:bounds[-1]].split(lens) for t in (q, k, v)]  # per sequence: [n, H, D] views
    outs: list[torch.Tensor | None] = [None] * len(lens)
    for segs in groups.values():
        padded = max(lens[s] for s in segs)

        def pad(seqs: tuple[torch.Tensor, ...]) -> torch.Tensor:  # one cat of the sequences and zero tails
            gap = seqs[0].new_zeros(padded, *seqs[0].shape[1:])
            parts = [p for s in segs for p in (seqs[s], gap[:padded - lens[s]]) if len(p)]
            return torch.cat(parts).view(len(segs), padded, *seqs[0].shape[1:]).transpose(1, 2)  # [S_b, H, P, D]

        if window is None or window >= padded:  # plain causal: SDPA's fused kernel, no mask tensor
            mask, causal = None, True
        else:
            i = torch.arange(padded, device=q.device)
            mask, causal = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window), False
        qs, ks, vs = (pad(p) for p in pieces)
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and padded < CPU_FP32_ATTENTION_BELOW:
            qs, ks, vs = qs.float(), ks.float(), vs.float()  # faster there (above); fp32 scores, same contract
        if softcap or sinks is not None:
            o = _explicit_attention(qs, ks, vs, window, scale, softcap, sinks)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                               enable_gqa=q.shape[2] != k.shape[2])
        rows = o.to(q.dtype).transpose(1, 2).unbind(0)  # S_b x [P, H, D]: slicing each row keeps backward per-row
        for row, s in zip(rows, segs):
            outs[s] = row[:lens[s]]
    head = [q.new_zeros(bounds[0], *q.shape[2:])] if bounds[0] else []
    tail = [q.new_zeros(q.shape[1] - bounds[-1], *q.shape[2:])] if q.shape[1] > bounds[-1] else []
    return torch.cat(head + outs + tail)[None]


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float,
                        softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Causal (+ window) attention of [S, H, P, D] blocks with soft-capped scores and / or per-head sink logits
    (SDPA has neither)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q.shape[2], device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    scores = scores.masked_fill(~allowed, float("-inf")).float()
    if sinks is not None:  # softmax over [scores, sink]; the sink's column is then dropped
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)
