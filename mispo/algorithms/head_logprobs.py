"""Token log-probs and entropy straight from the last hidden states and the output projection, a chunk of
positions at a time: the logits z = h W^T (+ b) exist for `chunk` positions at once, in the forward and,
recomputed, in the backward. No [tokens, vocab] tensor is ever held: not the logits, not their gradient.

    logp, ent = head_logprobs(hidden [N, H], weight [V, H], bias [V] or None, labels [N], temperature,
                              with_entropy=True, fp32=False)        # [N], [N] fp32

Per chunk of c positions:
    z = h_c W^T + b            in the weight's dtype, as the model's own lm_head computes it; with `fp32`,
                               float(h_c) float(W)^T + float(b) (model.fp32_lm_head's product)
    log p = log_softmax(z / t) in fp32 (`mispo.algorithms.logits.chunk_logp`), gathered at the labels
    backward: g_z = chunk_grad(...) (the same formula as the chunked log-softmax), then
    d h_c = g_z W,   d W += g_z^T h_c,   d b += sum_rows g_z
d W accumulates in the weight's dtype, one rounding per chunk (as Liger's fused linear cross-entropy does),
or in fp32 with `fp32` (cast to the weight's dtype at the end, what the fp32 head's cast gives).

Memory at the peak of the backward: one [c, V] chunk in the compute dtype, two fp32 [c, V] chunks, and the
gradients of h, W (and an fp32 copy of W with `fp32` and a low-precision weight). `head_chunk(V)` makes an
fp32 chunk HEAD_CHUNK_BYTES (c = 260 positions at the release's 128,896-token vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from mispo.algorithms.logits import chunk_entropy, chunk_grad

HEAD_CHUNK_BYTES = 128 << 20  # one fp32 [c, V] chunk


def head_chunk(vocab: int, chunk_bytes: int = HEAD_CHUNK_BYTES) -> int:
    """Positions per chunk: an fp32 [c, vocab] chunk of `chunk_bytes` (at least 16 positions)."""
    return max(16, chunk_bytes // (4 * vocab))


def _compute_copies(weight: Tensor, bias: Tensor | None, fp32: bool) -> tuple[Tensor, Tensor | None]:
    """The head's weight and bias as the product uses them: fp32 copies with `fp32` (once per pass)."""
    if not fp32:
        return weight, bias
    return weight.float(), None if bias is None else bias.float()


def _chunk_logp(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """fp32 log_softmax((h W^T + b) / t) of one chunk; the low-precision logits live only until their fp32
    copy exists, which is divided in place: two fp32 chunks at the peak."""
    z = F.linear(h.to(weight.dtype), weight, bias).float()
    if temperature != 1.0:
        z.div_(temperature)
    return torch.log_softmax(z, dim=-1)


class FusedHeadLogSoftmax(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] or None, labels [N] or None) -> (log p(label) [N] or None,
    entropy [N] or None), fp32, p = softmax((h W^T + b) / temperature), `chunk` positions at a time."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None,
                temperature: float, chunk: int, with_entropy: bool, fp32: bool):
        n = hidden.shape[0]
        logp = None if labels is None else torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        w, b = _compute_copies(weight, bias, fp32)
        for s in range(0, n, chunk):
            lp = _chunk_logp(hidden[s:s + chunk], w, b, temperature)
            if logp is not None:
                logp[s:s + chunk] = lp.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
            if ent is not None:
                ent[s:s + chunk] = chunk_entropy(lp)
            del lp
        del w, b
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        ctx.save_for_backward(hidden, weight, bias, labels, ent)
        ctx.temperature, ctx.chunk, ctx.fp32 = temperature, chunk, fp32
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_ent: Tensor | None):
        hidden, weight, bias, labels, ent = ctx.saved_tensors
        t, c, fp32 = ctx.temperature, ctx.chunk, ctx.fp32
        none = (None,) * 6
        if grad_logp is None and grad_ent is None:
            return (None, None) + none
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, b = _compute_copies(weight, bias, fp32)
        acc_dtype = torch.float32 if fp32 else weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32),
                             device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], c):
            rows = slice(s, s + c)
            h = hidden[rows].to(w.dtype)
            g = chunk_grad(_chunk_logp(h, w, b, t),
                           None if labels is None else labels[rows], None if ent is None else ent[rows],
                           None if grad_logp is None else grad_logp[rows],
                           None if grad_ent is None else grad_ent[rows], t)
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(w.dtype)
            if grad_h is not None:
                grad_h[rows] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.T, h)
            del g, h
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b) + none[:5]


def head_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None,
                  temperature: float = 1.0, with_entropy: bool = True, fp32: bool = False,
                  chunk: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """log p(label) and entropy per position of p = softmax((hidden W^T + b) / temperature), fp32, for
    hidden [..., H] and labels [...] (None: entropy only); no [..., V] tensor is held (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = chunk or head_chunk(weight.shape[0])
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    logp, ent = FusedHeadLogSoftmax.apply(flat, weight, bias, flat_labels, float(temperature), int(chunk),
                                          with_entropy, fp32)
    return (None if logp is None else logp.reshape(lead)), (None if ent is None else ent.reshape(lead))
