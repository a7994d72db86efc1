"""Token log-probabilities and entropy from logits, in chunks, at a sampling temperature.

A [N, V] fp32 copy of the logits (V = 128,896 in the release) is the usual memory peak of an RL
step. These functions read ``chunk_size`` positions of the logits at a time, in fp32, and never
hold an fp32 tensor larger than [chunk_size, V] (two transient ones of that size per chunk):
not in the forward, and not in the backward, which recomputes each chunk's softmax and writes its
gradient straight into the logits' gradient (one tensor of the logits' own shape and dtype).

They are one custom autograd function (`ChunkedLogSoftmax`) rather than activation checkpointing
per chunk: a checkpointed slice's backward allocates a zero gradient of the *whole* logits per
chunk, so its backward peak is two full-size gradients instead of one.

Temperature: the distribution is softmax(z / temperature), the one vLLM samples from at that
temperature; gradients are taken with respect to the raw logits z.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mispo.algorithms.masked import masked_mean

LOGITS_CHUNK = 1024  # positions per chunk: 1024 x 128,896 fp32 = 0.5 GiB at the release's vocabulary


def chunk_logp(z: Tensor, temperature: float) -> Tensor:
    """fp32 log-softmax of one chunk of logits at the temperature (one fp32 chunk besides the result)."""
    u = z.float()
    if temperature != 1.0:
        u = u / temperature if u is z else u.div_(temperature)  # never write into the caller's logits
    return torch.log_softmax(u, dim=-1)


def chunk_entropy(logp: Tensor) -> Tensor:
    """-sum p log p of one chunk, p log p built in one buffer; p == 0 (a -inf logit, e.g. a vocabulary
    mask) contributes 0, not nan."""
    return -logp.exp().mul_(logp).nan_to_num_(nan=0.0).sum(-1)


def chunk_grad(logp: Tensor, labels: Tensor | None, ent: Tensor | None, grad_logp: Tensor | None,
               grad_ent: Tensor | None, temperature: float) -> Tensor:
    """d loss / d z for one chunk, z the raw logits, from its fp32 log p = log softmax(z / t) (overwritten:
    the result is built in its buffer), with g_y = d loss / d log p(y), g_H = d loss / d H:
        d loss / d u = g_y (onehot(y) - p) - g_H p (log p + H),   d loss / d z = (d loss / d u) / t.
    Two fp32 chunks (log p, p) when the entropy is differentiated, one otherwise."""
    if grad_ent is None:  # g_y (onehot(y) - p), in log p's own buffer: one fp32 chunk
        g = logp.exp_().mul_(-grad_logp[:, None])
    else:  # -g_H p (log p + H) in log p's buffer; p == 0 (-inf logits) gives nan, set to 0
        p = logp.exp()
        g = logp.add_(ent[:, None]).mul_(p).masked_fill_(p == 0, 0.0).mul_(-grad_ent[:, None])
        if grad_logp is not None:
            g.addcmul_(p, grad_logp[:, None], value=-1.0)
        del p
    if grad_logp is not None:
        g.scatter_add_(-1, labels[:, None], grad_logp[:, None])
    return g.div_(temperature) if temperature != 1.0 else g


class ChunkedLogSoftmax(torch.autograd.Function):
    """(logits [N, V], labels [N] or None) -> (log p(label) [N] or None, entropy [N] or None), fp32,
    with p = softmax(logits / temperature), computed `chunk_size` rows at a time.

    Backward, per chunk: `chunk_grad` (two fp32 chunks and a bool mask, or one when nothing
    differentiates the entropy: a detached entropy costs nothing in the backward)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor | None, temperature: float, chunk_size: int,
                with_entropy: bool):
        n = logits.shape[0]
        logp = None if labels is None else torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty(n, dtype=torch.float32, device=logits.device) if with_entropy else None
        for s in range(0, n, chunk_size):
            lp = chunk_logp(logits[s:s + chunk_size], temperature)
            if logp is not None:
                logp[s:s + chunk_size] = lp.gather(-1, labels[s:s + chunk_size, None]).squeeze(-1)
            if ent is not None:
                ent[s:s + chunk_size] = chunk_entropy(lp)
            del lp
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        ctx.save_for_backward(logits, labels, ent)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_ent: Tensor | None):
        logits, labels, ent = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk_size
        if grad_logp is None and grad_ent is None:
            return None, None, None, None, None
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], c):
            rows = slice(s, s + c)
            grad[rows] = chunk_grad(chunk_logp(logits[rows], t), labels[rows] if labels is not None else None,
                                    None if ent is None else ent[rows],
                                    None if grad_logp is None else grad_logp[rows],
                                    None if grad_ent is None else grad_ent[rows], t)
        return grad, None, None, None, None


def _apply(logits: Tensor, labels: Tensor | None, temperature: float, chunk_size: int,
           with_entropy: bool) -> tuple[Tensor | None, Tensor | None]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    logp, ent = ChunkedLogSoftmax.apply(flat, flat_labels, float(temperature), chunk_size, with_entropy)
    return (None if logp is None else logp.reshape(lead)), (None if ent is None else ent.reshape(lead))


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int = LOGITS_CHUNK,
                         temperature: float = 1.0) -> Tensor:
    """log softmax(z / temperature)[label] per position: [..., V], [...] -> [...] (fp32)."""
    return _apply(logits, labels, temperature, chunk_size, with_entropy=False)[0]


def entropy_from_logits(logits: Tensor, chunk_size: int = LOGITS_CHUNK, temperature: float = 1.0) -> Tensor:
    """H(softmax(z / temperature)) per position: [..., V] -> [...] (fp32)."""
    return _apply(logits, None, temperature, chunk_size, with_entropy=True)[1]


def logprobs_and_entropy(logits: Tensor, labels: Tensor, chunk_size: int = LOGITS_CHUNK,
                         temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Both of the above in one pass over the vocabulary: ([...], [...]) fp32."""
    return _apply(logits, labels, temperature, chunk_size, with_entropy=True)


def masked_entropy(logits: Tensor, mask: Tensor, chunk_size: int = LOGITS_CHUNK) -> Tensor:
    """Masked mean entropy: sum_t m_t H_t / sum_t m_t (0 for an empty mask)."""
    return masked_mean(entropy_from_logits(logits, chunk_size), mask)
