"""Advantages: GAE with truncation-aware bootstrap, group-normalised (GRPO, RLOO), whitening.

Conventions: ``values[b, t]`` is V(s_t), the critic's value of the state before generated token
t; ``mask`` marks the generated tokens that count. Positions outside the mask (prompt, padding,
environment / tool tokens) are skipped: GAE runs over the masked tokens of a row as one
contiguous trajectory, and every output is 0 outside the mask.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from mispo.algorithms.masked import masked_count, masked_mean, masked_std, masked_whiten

GROUP_ADV_METHODS = ("grpo", "grpo_no_std", "drgrpo", "rloo")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last masked position of each row [B] (0 for rows without one)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).amax(dim=-1)


def outcome_to_token_rewards(rewards: Tensor, mask: Tensor, truncated: Optional[Tensor] = None) -> Tensor:
    """Place a per-sequence reward R [B] on the last masked token: r[b, last_b] = R_b.

    Rows with ``truncated`` True get no reward (their return is bootstrapped instead), and rows
    without masked tokens get nothing.
    """
    m = mask.bool()
    r = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    give = m.any(dim=-1)
    if truncated is not None:
        give = give & ~truncated.bool()
    vals = torch.where(give, rewards.detach().float(), torch.zeros((), device=m.device))
    return r.scatter(1, last_token_index(m)[:, None], vals[:, None])


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    truncated: Optional[Tensor] = None,
    bootstrap_value: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation -> ``(advantages [B, T], returns [B, T])``.

    Over the masked tokens t_0 < ... < t_{n-1} of a row:
        delta_k = r_k + gamma * V_{k+1} - V_k,   A_k = delta_k + gamma * lam * A_{k+1},
        returns_k = A_k + V_k  (the critic's targets),
    with V_n = V(s_T) for a response cut by the length limit (``truncated`` [B] True) and 0
    otherwise. V(s_T) is ``bootstrap_value`` [B] when given, else the value at the row's last
    masked position. ``rewards`` is a per-sequence outcome R [B] (placed on the last token, and
    dropped for truncated rows: R_hat = V(s_T) in place of R) or per-token rewards [B, T] (used as
    given). With gamma = lam = 1:  A_t = R_hat - V(s_t) (plus any later per-token rewards).
    Computed in fp32, detached.
    """
    m = mask.bool()
    if values.shape != m.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(m.shape)} must have the same shape")
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    v = torch.where(m, values.detach().float(), zero)
    if rewards.dim() == 1:
        r = outcome_to_token_rewards(rewards, m, truncated)
    elif rewards.shape == m.shape:
        r = torch.where(m, rewards.detach().float(), zero)
    else:
        raise ValueError(f"rewards must be [B] or [B, T] = {tuple(m.shape)}, got {tuple(rewards.shape)}")
    B, T = m.shape
    next_v = torch.zeros(B, dtype=torch.float32, device=m.device)
    if truncated is not None:
        if bootstrap_value is None:
            boot = v.gather(1, last_token_index(m)[:, None]).squeeze(1)
        else:
            boot = bootstrap_value.detach().float().reshape(B)
        next_v = torch.where(truncated.bool() & m.any(dim=-1), boot, next_v)

    if gamma == 1.0 and lam == 1.0:
        # A_t = sum_{k >= t} r_k + V_boot - V_t  (the deltas telescope).
        ret = r.flip(-1).cumsum(-1).flip(-1) + next_v[:, None]
        adv = torch.where(m, ret - v, zero)
    else:
        adv = torch.zeros_like(v)
        gae = torch.zeros(B, dtype=torch.float32, device=m.device)
        for t in reversed(range(T)):
            mt = m[:, t]
            delta = r[:, t] + gamma * next_v - v[:, t]
            new_gae = delta + gamma * lam * gae
            gae = torch.where(mt, new_gae, gae)
            next_v = torch.where(mt, v[:, t], next_v)
            adv[:, t] = torch.where(mt, new_gae, zero)
    returns = torch.where(m, adv + v, zero)
    return adv, returns


def group_ids_from_size(batch_size: int, group_size: int, device=None) -> Tensor:
    """Contiguous groups: ids = [0]*G + [1]*G + ...  (batch_size must be a multiple of G)."""
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of group_size={group_size}")
    return torch.arange(batch_size, device=device) // group_size


def group_advantages(
    rewards: Tensor,
    group_ids: Optional[Tensor] = None,
    group_size: Optional[int] = None,
    method: str = "grpo",
    eps: float = 1e-6,
) -> Tensor:
    """Per-sequence advantages [B] from rewards [B] normalised within groups (same prompt).

    With group g of n samples, mean mu_g and unbiased std sigma_g:
      "grpo":                  A_i = (R_i - mu_g) / (sigma_g + eps)
      "grpo_no_std" / "drgrpo": A_i = R_i - mu_g
      "rloo":                  A_i = R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mu_g)
    Groups of one sample carry no baseline information and get A = 0. Give either ``group_ids``
    (any integer labels) or ``group_size`` (contiguous groups).
    """
    if method not in GROUP_ADV_METHODS:
        raise ValueError(f"group advantage method={method!r} is not one of {GROUP_ADV_METHODS}")
    r = rewards.detach().float().reshape(-1)
    B = r.shape[0]
    if group_ids is None:
        if group_size is None:
            raise ValueError("group_advantages needs group_ids or group_size")
        group_ids = group_ids_from_size(B, group_size, r.device)
    _, inv = torch.unique(group_ids.reshape(-1), return_inverse=True)
    G = int(inv.max()) + 1 if B else 0
    n = torch.zeros(G, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mu = torch.zeros(G, device=r.device).index_add_(0, inv, r) / n
    centred = r - mu[inv]
    n_i = n[inv]
    if method in ("grpo_no_std", "drgrpo"):
        adv = centred
    elif method == "rloo":
        adv = centred * n_i / (n_i - 1.0).clamp(min=1.0)
    else:
        ss = torch.zeros(G, device=r.device).index_add_(0, inv, centred ** 2)
        std = (ss / (n - 1.0).clamp(min=1.0)).sqrt()
        adv = centred / (std[inv] + eps)
    return torch.where(n_i > 1, adv, torch.zeros_like(adv))


def sequence_to_token(adv: Tensor, mask: Tensor) -> Tensor:
    """Broadcast per-sequence values [B] to the masked tokens [B, T] (0 elsewhere)."""
    return torch.where(mask.bool(), adv.float()[:, None], torch.zeros((), device=adv.device))


def whiten_advantages(adv: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """A <- (A - mean) / sqrt(var + eps) over masked tokens (batch statistics, unbiased var)."""
    return masked_whiten(adv, mask, shift_mean=shift_mean, eps=eps)


def advantage_metrics(adv: Tensor, mask: Tensor, returns: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """adv/mean, adv/std, adv/abs_max (and returns/mean, returns/std) over masked tokens."""
    m = mask.bool()
    a = torch.where(m, adv.detach().float(), torch.zeros((), device=adv.device))
    out = {
        "adv/mean": masked_mean(a, m),
        "adv/std": masked_std(a, m),
        "adv/abs_max": a.abs().amax() if a.numel() else torch.zeros((), device=a.device),
        "adv/num_tokens": masked_count(m),
    }
    if returns is not None:
        out["returns/mean"] = masked_mean(returns.detach(), m)
        out["returns/std"] = masked_std(returns.detach(), m)
    return out
