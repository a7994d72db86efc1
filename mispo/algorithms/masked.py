"""Masked reductions and loss aggregation.

Every helper reads values only where ``mask`` is true, through ``torch.where`` rather than a
product, so padding that holds ``nan`` or ``inf`` (a common sight in logprob buffers) cannot leak
into a result or a gradient. Reductions are done in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "token-sum-norm")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (as fp32) where ``mask``, 0 elsewhere."""
    return torch.where(mask.bool(), x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_i mask_i * x_i  (fp32; over all elements when ``dim`` is None)."""
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_count(mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_i mask_i as fp32."""
    m = mask.bool().float()
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_i mask_i x_i / sum_i mask_i, and 0 where the mask is empty (never nan)."""
    return masked_sum(x, mask, dim) / masked_count(mask, dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over masked elements: sum_i m_i (x_i - mean)^2 / (n - 1 if unbiased else n); 0 if n < 2."""
    n = masked_count(mask)
    mean = masked_mean(x, mask)
    sq = masked_sum((x.float() - mean) ** 2, mask)
    denom = (n - 1.0) if unbiased else n
    return torch.where(n >= 2, sq / denom.clamp(min=1.0), torch.zeros_like(sq))


def masked_std(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """sqrt(masked_var)."""
    return masked_var(x, mask, unbiased).sqrt()


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """max over masked elements, 0 if the mask is empty."""
    m = mask.bool()
    if not bool(m.any()):
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.float()[m].max()


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked elements (mean added back if not ``shift_mean``).

    Statistics use the unbiased variance; the result is 0 outside the mask.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask)


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    norm_length: Optional[float] = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    - ``token-mean``:          sum_{b,t} m l / N_tok, N_tok = ``num_tokens`` or sum m.
    - ``seq-mean-token-mean``: sum_b [ sum_t m l / sum_t m ] / N_seq, N_seq = ``num_seqs`` or the
      number of rows with at least one masked token (padding rows do not count).
    - ``token-sum-norm`` (Dr.GRPO): sum_{b,t} m l / (N_seq * L), L = ``norm_length`` (a fixed
      constant such as the generation max length; defaults to T, which makes the result depend
      on padding, so set it).

    Pass ``num_tokens`` / ``num_seqs`` (the totals of the whole mini-batch, across gradient
    accumulation steps and data-parallel ranks) to make micro-batch losses add up to the
    mini-batch loss. Empty denominators are clamped to 1, so an empty batch gives 0, not nan.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg={mode!r} is not one of {LOSS_AGG_MODES}")
    m = mask.bool()
    if mode == "token-mean":
        if num_tokens is None:
            denom = masked_count(m)
        else:
            denom = torch.tensor(float(num_tokens), device=loss_mat.device)
        return masked_sum(loss_mat, m) / denom.clamp(min=1.0)
    row_counts = masked_count(m, dim=-1)
    if num_seqs is None:
        n_seq = (row_counts > 0).float().sum()
    else:
        n_seq = torch.tensor(float(num_seqs), device=loss_mat.device)
    if mode == "seq-mean-token-mean":
        per_seq = masked_sum(loss_mat, m, dim=-1) / row_counts.clamp(min=1.0)
        return per_seq.sum() / n_seq.clamp(min=1.0)
    length = float(loss_mat.shape[-1]) if norm_length is None else float(norm_length)
    return masked_sum(loss_mat, m) / (n_seq.clamp(min=1.0) * length)
