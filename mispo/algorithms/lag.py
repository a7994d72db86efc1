"""The lag correction of staleness-aware MIS-PO (``mispo_decoupled``) and its per-lag diagnostics.

A token sampled by the engine at weights version v and trained with the learner at version n >= v
(lag k = n - v) has three probabilities: pi_rollout (the engine at v), pi_v (the learner at v) and
pi_old (the learner at n). Its ratio to the engine splits in two:

    pi_old / pi_rollout  =  (pi_v / pi_rollout)  *  (pi_old / pi_v)
                             engine mismatch        lag (k versions of learning)

MIS-PO's binary filters are sized for the first factor (precision, kernels, routing at the same
weights). The second is corrected by a truncated importance weight (as TIS truncates pi_old / pi_rollout; AReaL's
decoupled objective makes the same pi_prox / pi_behav split):

    w_t = min(pi_old / pi_v, C)                       (C = ``lag_cap``, default 2)

With no lag (pi_v = pi_old) w_t = 1 exactly, so the loss is the report's MIS-PO bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mispo.algorithms.filters import token_log_ratio

_CLAMP = 20.0


def lag_weight(logp_old: Tensor, logp_version: Tensor, mask: Tensor, cap: float) -> Tensor:
    """w_t = min(exp(logp_old - logp_version), cap) where ``mask``, 0 elsewhere (fp32, detached)."""
    log_g = token_log_ratio(logp_old, logp_version, mask).clamp(-_CLAMP, _CLAMP)
    return torch.where(mask.bool(), torch.exp(log_g).clamp(max=cap), torch.zeros((), device=log_g.device))


def effective_sample_size(weights: Tensor, mask: Tensor) -> Tensor:
    """ESS / n = (sum w)^2 / (n * sum w^2) over ``mask`` (1 for equal weights, 1/n for one weight); 0-d fp32,
    1 when nothing is masked in (nothing to reweight)."""
    m = mask.bool()
    w = torch.where(m, weights.float(), torch.zeros((), device=weights.device))
    n, sq = m.sum(), (w * w).sum()
    if int(n) == 0 or float(sq) == 0.0:
        return torch.ones((), dtype=torch.float32, device=weights.device)
    return (w.sum() ** 2 / (n * sq)).float()


def lag_buckets(lags: Tensor, mask: Tensor, top: int = 4) -> dict[str, Tensor]:
    """{'0': mask of lag-0 tokens, '1': ..., f'{top}+': lag >= top} over ``mask``; empty buckets left out."""
    m = mask.bool()
    out = {}
    for k in range(top + 1):
        here = m & ((lags == k) if k < top else (lags >= k))
        if bool(here.any()):
            out[str(k) if k < top else f"{top}+"] = here
    return out


def lag_metrics(lags: Tensor, mask: Tensor, keep: Tensor, weights: Tensor | None,
                log_ratio_total: Tensor, log_ratio_lag: Tensor | None) -> dict[str, float]:
    """Per lag bucket b (tokens trained k versions after they were sampled): `lag/<b>/tokens` (share of the
    step's tokens), `lag/<b>/accept` (share the loss trains on), `lag/<b>/ess` (ESS / n of the kept tokens'
    weights; a binary mask gives 1), `lag/<b>/abs_log_ratio` (mean |log pi_old / pi_rollout|) and, when the
    learner scored each token at its own version, `lag/<b>/drift` (mean |log pi_old / pi_v|)."""
    m = mask.bool()
    total = max(int(m.sum()), 1)
    out: dict[str, float] = {}
    for name, here in lag_buckets(lags, m).items():
        kept = here & keep.bool()
        out[f"lag/{name}/tokens"] = float(here.sum()) / total
        out[f"lag/{name}/accept"] = float(kept.sum()) / float(here.sum())
        w = weights if weights is not None else kept.float()
        out[f"lag/{name}/ess"] = float(effective_sample_size(w, kept))
        out[f"lag/{name}/abs_log_ratio"] = float(log_ratio_total[here].abs().mean())
        if log_ratio_lag is not None:
            out[f"lag/{name}/drift"] = float(log_ratio_lag[here].abs().mean())
    return out
