"""Token log-probabilities and entropy from logits, in chunks.

A [B, T, V] fp32 copy of the logits (V ~ 128k) is the usual memory peak of an RL step. These
functions work on ``chunk_size`` positions at a time in fp32 and, when a gradient is needed,
recompute each chunk in the backward pass (activation checkpointing), so the extra memory is
about ``chunk_size * V`` floats rather than ``B * T * V``.
Apply the sampling temperature (``logits / T``) before calling them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mispo.algorithms.masked import masked_mean


def _entropy_chunk(z: Tensor) -> Tensor:
    z = z.float()
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    # p * z with p == 0 and z == -inf would be nan: those terms are 0.
    pz = torch.where(p > 0, p * z, torch.zeros((), dtype=z.dtype, device=z.device))
    return lse - pz.sum(dim=-1)


def _logprob_chunk(z: Tensor, labels: Tensor) -> Tensor:
    z = z.float()
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _chunked(fn: Callable[..., Tensor], logits: Tensor, *extra: Tensor, chunk_size: int) -> Tensor:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_extra = [e.reshape(-1) for e in extra]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    outs = []
    for start in range(0, flat.shape[0], chunk_size):
        args = [flat[start:start + chunk_size]] + [e[start:start + chunk_size] for e in flat_extra]
        outs.append(checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args))
    if not outs:
        return torch.zeros(lead, dtype=torch.float32, device=logits.device)
    return torch.cat(outs).reshape(lead)


def entropy_from_logits(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v per position: [..., V] -> [...] (fp32)."""
    return _chunked(_entropy_chunk, logits, chunk_size=chunk_size)


def masked_entropy(logits: Tensor, mask: Tensor, chunk_size: int = 2048) -> Tensor:
    """Masked mean entropy: sum_t m_t H_t / sum_t m_t (0 for an empty mask)."""
    return masked_mean(entropy_from_logits(logits, chunk_size), mask)


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int = 2048,
                         temperature: Optional[float] = None) -> Tensor:
    """log softmax(z / temperature)[label] per position: [..., V], [...] -> [...] (fp32)."""
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    return _chunked(_logprob_chunk, logits, labels, chunk_size=chunk_size)
