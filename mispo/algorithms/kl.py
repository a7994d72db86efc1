"""Per-token KL estimators between the policy and a reference policy.

With d_t = logp_ref_t - logp_t = log(pi_ref / pi_theta) on the sampled token a_t:

    k1        = -d                           = log(pi_theta / pi_ref)
    k2        = d^2 / 2
    k3        = exp(d) - d - 1               (Schulman's low-variance, non-negative estimator)
    unbiased  = (pi_theta / pi_old) * k3     (DeepSeek-V3.2: importance-weighted k3, unbiased for
                                              KL(pi_theta || pi_ref) when a_t ~ pi_old, and its
                                              gradient is the true KL gradient)

``logp_ref`` and ``logp_old`` are treated as constants (detached); ``logp`` carries the gradient.
Log differences are clamped to [-20, 20] before ``exp`` so that one wild token cannot overflow;
results are fp32 and 0 outside ``mask`` when a mask is given.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

_CLAMP = 20.0


def _d(logp: Tensor, logp_ref: Tensor) -> Tensor:
    return logp_ref.detach().float() - logp.float()


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = logp - logp_ref."""
    return -_d(logp, logp_ref)


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = (logp - logp_ref)^2 / 2."""
    return 0.5 * _d(logp, logp_ref) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 = exp(d) - d - 1, d = logp_ref - logp."""
    d = _d(logp, logp_ref).clamp(-_CLAMP, _CLAMP)
    return torch.exp(d) - d - 1.0


def kl_unbiased(logp: Tensor, logp_ref: Tensor, logp_old: Tensor) -> Tensor:
    """KL_t = (pi_theta/pi_old) * (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1)  (DeepSeek-V3.2)."""
    log_ratio = (logp.float() - logp_old.detach().float()).clamp(-_CLAMP, _CLAMP)
    return torch.exp(log_ratio) * kl_k3(logp, logp_ref)


KL_ESTIMATORS: Dict[str, Callable[..., Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "unbiased": kl_unbiased,
}


def kl_penalty(
    estimator: str,
    logp: Tensor,
    logp_ref: Tensor,
    logp_old: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Per-token KL [B, T] by name: "k1", "k2", "k3" or "unbiased" (needs ``logp_old``).

    Positions outside ``mask`` are 0 (computed from sanitised inputs, so nan padding is harmless).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
    if mask is not None:
        m = mask.bool()
        zero = torch.zeros((), dtype=torch.float32, device=logp.device)
        logp = torch.where(m, logp.float(), zero)
        logp_ref = torch.where(m, logp_ref.float(), zero)
        if logp_old is not None:
            logp_old = torch.where(m, logp_old.float(), zero)
    if estimator == "unbiased":
        if logp_old is None:
            raise ValueError("kl_estimator='unbiased' needs logp_old (the pre-update policy's logprobs)")
        out = kl_unbiased(logp, logp_ref, logp_old)
    else:
        out = KL_ESTIMATORS[estimator](logp, logp_ref)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
