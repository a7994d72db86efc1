"""Critic (value) loss."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from mispo.algorithms.masked import aggregate_loss, masked_mean, masked_var


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    old_values: Optional[Tensor] = None,
    clip_range: Optional[float] = None,
    keep_mask: Optional[Tensor] = None,
    loss_agg: str = "token-mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    norm_length: Optional[float] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Masked MSE to the returns, optionally clipped around the old values.

        l_t = 1/2 (V_t - R_t)^2
        clipped (``clip_range`` c, needs ``old_values``):
        l_t = 1/2 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)

    aggregated with :func:`aggregate_loss` over ``mask``. ``keep_mask`` [B, T] (e.g. MIS-PO's
    token_keep & traj_keep) zeroes the rejected tokens' terms without changing the denominator;
    by default (None) the critic trains on every generated token, as in the report.
    Metrics: critic/vf_loss, critic/value_mean, critic/return_mean, critic/vf_clip_frac,
    critic/explained_var = 1 - Var(R - V) / Var(R).
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    v = torch.where(m, values.float(), zero)
    ret = torch.where(m, returns.detach().float(), zero)
    err = (v - ret) ** 2
    clip_frac = zero
    if clip_range is not None:
        if old_values is None:
            raise ValueError("value clipping (clip_range) needs old_values")
        vo = torch.where(m, old_values.detach().float(), zero)
        v_clip = vo + (v - vo).clamp(-clip_range, clip_range)
        err_clip = (v_clip - ret) ** 2
        clip_frac = masked_mean((err_clip > err).float(), m)
        err = torch.maximum(err, err_clip)
    loss_mat = 0.5 * err
    if keep_mask is not None:
        loss_mat = torch.where(keep_mask.bool(), loss_mat, zero)
    loss = aggregate_loss(loss_mat, m, loss_agg, num_tokens, num_seqs, norm_length)
    with torch.no_grad():
        var_ret = masked_var(ret, m)
        resid = masked_var(ret - v.detach(), m)
        expl = torch.where(var_ret > 0, 1.0 - resid / var_ret.clamp(min=1e-12), zero)
        metrics = {
            "critic/vf_loss": loss.detach(),
            "critic/value_mean": masked_mean(v.detach(), m),
            "critic/return_mean": masked_mean(ret, m),
            "critic/vf_clip_frac": clip_frac,
            "critic/explained_var": expl,
            "critic/num_tokens": m.sum().float(),  # the weight of the means above (mispo.learner.metrics)
        }
    return loss, metrics
