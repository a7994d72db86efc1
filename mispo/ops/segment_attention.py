"""Attention over packed sequences, one SDPA per group of similar-length sequences: the plain-torch path of
the learner's packed attention (`mispo.learner.packed_attention`, any transformers model) and of Step3p5's
reference backend (`mispo.models.step3p5.reference_ops`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bucket(n: int) -> int:
    """Padded length of a length-n sequence in `segment_attention`: n rounded up to a quarter of its
    power of two (>= 16), so padding wastes at most a third."""
    step = max(16, 1 << max((n - 1).bit_length() - 2, 0))
    return -(-n // step) * step


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      window: int | None, scale: float, softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Packed [1, T] attention computed per sequence: the sequences (bounds `cu_seqlens`) are grouped
    by padded length P (`_bucket`), each group scattered into a [S_b, P] batch and attended with one
    causal (+ window) [P, P] mask, and the outputs gathered back. Padding keys sit after every real
    query of their row, so the causal mask hides them. `softcap` (Gemma 2): scores s = q.k * scale become
    softcap * tanh(s / softcap) before the mask and softmax. `sinks` (gpt-oss, [heads]): one more logit per head
    joins each softmax and takes its share of the mass, attending to nothing."""
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
        if softcap or sinks is not None:
            o = _explicit_attention(pad(q), pad(k), pad(v), window, scale, softcap, sinks)
        else:
            o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=causal,
                                               scale=scale, enable_gqa=q.shape[2] != k.shape[2])
        out[0, token] = o.transpose(1, 2)[row, offset]
    return out


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
