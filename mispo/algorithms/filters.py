"""MIS-PO filters: which generated tokens and trajectories count as on-policy.

Per generated token t of trajectory tau (only positions where ``mask`` is true)::

    x_t      = pi_old(a_t|s_t) / pi_rollout(a_t|s_t) = exp(logp_old_t - logp_rollout_t)
    rho(tau) = exp( mean_t log x_t )                     # geometric mean over the trajectory
    token_keep_t = lo_tok  <= x_t      <= hi_tok
    traj_keep    = lo_traj <= rho(tau) <= hi_traj

Everything is computed on log ratios in fp32 (``exp`` never overflows, bf16 inputs are upcast).
Bounds are inclusive; a ratio that equals a bound up to fp32 rounding of the log ratio (within
``LOG_BOUND_ATOL`` in log space, i.e. a relative 1e-6 on the ratio) counts as on the bound and
is kept, so ``logp_old = logp_rollout + log(2)`` is kept by the band [0.5, 2] although fp32
cannot hold log(2) exactly.

A trajectory with no counted tokens (an empty response, or every token masked out) has
nothing to train on: its ``traj_keep`` is False and its ``log_rho`` is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from mispo.algorithms.masked import masked_count, masked_mean
from mispo.bands import TOKEN_BAND, TRAJ_BAND
from mispo.bands import checked_band as _check_bounds

LOG_BOUND_ATOL = 1e-6
"""Slack (in log space) by which a log ratio may pass a bound and still count as on it."""


def _in_band(log_x: Tensor, bounds: Tuple[float, float], atol: float) -> Tensor:
    """log(lo) - atol <= log_x <= log(hi) + atol  (False for nan)."""
    lo, hi = bounds
    log_lo = -math.inf if lo == 0.0 else math.log(lo)
    log_hi = math.inf if math.isinf(hi) else math.log(hi)
    return (log_x >= log_lo - atol) & (log_x <= log_hi + atol)


def token_log_ratio(logp_old: Tensor, logp_rollout: Tensor, mask: Tensor) -> Tensor:
    """log x_t = logp_old_t - logp_rollout_t in fp32 where ``mask``, 0 elsewhere."""
    d = logp_old.detach().float() - logp_rollout.detach().float()
    return torch.where(mask.bool(), d, torch.zeros((), dtype=torch.float32, device=d.device))


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """log rho = sum_t m_t log x_t / sum_t m_t per row [B]; 0 for rows without masked tokens."""
    return masked_mean(log_ratio, mask, dim=-1)


@dataclass
class MISFilterResult:
    """Output of :func:`mis_filter_detailed` (all tensors detached)."""

    token_keep: Tensor  # [B, T] bool, False outside mask
    traj_keep: Tensor  # [B] bool
    log_ratio: Tensor  # [B, T] fp32, log x_t, 0 outside mask
    log_rho: Tensor  # [B] fp32, mean log x_t over the counted tokens (0 if none)
    num_counted: Tensor  # [B] fp32, tokens counted by the trajectory statistic

    @property
    def keep(self) -> Tensor:
        """token_keep & traj_keep, [B, T]."""
        return self.token_keep & self.traj_keep[:, None]


def mis_filter_detailed(
    logp_old: Tensor,
    logp_rollout: Tensor,
    mask: Tensor,
    token_bounds: Tuple[float, float] = TOKEN_BAND,
    traj_bounds: Tuple[float, float] = TRAJ_BAND,
    traj_stat_includes_rejected: bool = True,
    atol: float = LOG_BOUND_ATOL,
) -> MISFilterResult:
    """MIS-PO filters with all options and intermediate values.

    token_keep_t = m_t * [log lo_tok <= log x_t <= log hi_tok]
    log rho      = sum_t c_t log x_t / sum_t c_t,  c = m (default) or m * token_keep
                   (``traj_stat_includes_rejected=False``)
    traj_keep    = [sum_t c_t > 0] * [log lo_traj <= log rho <= log hi_traj]
    Comparisons allow ``atol`` of slack in log space (see the module docstring).
    """
    if logp_old.shape != logp_rollout.shape or logp_old.shape != mask.shape or logp_old.dim() != 2:
        raise ValueError(
            "mis_filter expects logp_old, logp_rollout and mask of the same shape [B, T], got "
            f"{tuple(logp_old.shape)}, {tuple(logp_rollout.shape)}, {tuple(mask.shape)}"
        )
    token_bounds = _check_bounds("token_bounds", token_bounds)
    traj_bounds = _check_bounds("traj_bounds", traj_bounds)
    with torch.no_grad():
        m = mask.bool()
        log_ratio = token_log_ratio(logp_old, logp_rollout, m)
        token_keep = m & _in_band(log_ratio, token_bounds, atol)
        counted = m if traj_stat_includes_rejected else token_keep
        num_counted = masked_count(counted, dim=-1)
        log_rho = sequence_log_ratio(log_ratio, counted)
        traj_keep = (num_counted > 0) & _in_band(log_rho, traj_bounds, atol)
    return MISFilterResult(token_keep, traj_keep, log_ratio, log_rho, num_counted)


def mis_filter(
    logp_old: Tensor,
    logp_rollout: Tensor,
    mask: Tensor,
    token_bounds: Tuple[float, float] = TOKEN_BAND,
    traj_bounds: Tuple[float, float] = TRAJ_BAND,
) -> Tuple[Tensor, Tensor]:
    """MIS-PO token and trajectory filters -> ``(token_keep [B, T], traj_keep [B])`` booleans.

    x_t = exp(logp_old_t - logp_rollout_t);  rho = exp(mean_{t in mask} log x_t)
    token_keep_t = mask_t and lo_tok <= x_t <= hi_tok;  traj_keep = lo_traj <= rho <= hi_traj
    (inclusive; rows with no masked token get traj_keep False). ``mask`` marks the generated
    tokens that count (no prompt, padding or environment tokens). Inputs may be fp32 or bf16;
    the work is done in fp32 on log ratios, detached. See :func:`mis_filter_detailed` for the
    options the report leaves open.
    """
    res = mis_filter_detailed(logp_old, logp_rollout, mask, token_bounds, traj_bounds)
    return res.token_keep, res.traj_keep


def mis_filter_metrics(res: MISFilterResult, mask: Tensor, prefix: str = "mispo") -> Dict[str, Tensor]:
    """Keep fractions and the trajectory statistic (detached 0-d fp32 tensors).

    token_keep_frac = sum token_keep / sum m;  traj_keep_frac = kept rows / rows with tokens;
    keep_frac = sum (token_keep & traj_keep) / sum m;  log_rho_abs_mean over rows with tokens.
    The per-token gap |log x_t| is the losses' `mismatch/log_ratio_abs_{mean,max}` (one name for it).
    """
    m = mask.bool()
    rows = m.any(dim=-1)
    return {
        f"{prefix}/token_keep_frac": masked_mean(res.token_keep.float(), m),
        f"{prefix}/traj_keep_frac": masked_mean(res.traj_keep.float(), rows),
        f"{prefix}/keep_frac": masked_mean(res.keep.float(), m),
        f"{prefix}/log_rho_abs_mean": masked_mean(res.log_rho.abs(), rows),
    }


class AdaptiveTrajBand:
    """Trajectory band re-chosen each batch so that about ``target_keep`` of trajectories pass.

    The band keeps the shape of ``base_bounds`` in log space and scales it:
    ``(lo, hi) = (lo0 ** s, hi0 ** s)``. Trajectory i needs the scale
    ``s_i = max(log rho_i / log lo0, log rho_i / log hi0, 0)``; per batch
    ``s_batch = quantile(s_i, target_keep)`` (the "higher" order statistic, so at least the
    target fraction passes), smoothed ``s <- ema_decay * s + (1 - ema_decay) * s_batch`` (the first
    batch sets s), and the band width ``s * log(hi0 / lo0)`` is clamped to
    ``[min_width, max_width]``. With a symmetric base band (lo0 = 1 / hi0) the scale is
    ``|log rho| / log hi0``: the quantile of |log rho|.

    ``min_width`` defaults to the base band's width, so the band only widens when the batch
    needs it: a tighter-than-base band would throw away good samples just to hit the target.
    ``max_width`` defaults to 10 base widths. Fixed bands (plain ``mis_filter``) stay the default
    in MIS-PO; use this when staleness makes the report's band starve the gradient.

    Typical use, once per rollout batch::

        bounds = band.update(logp_old, logp_rollout, mask)
        token_keep, traj_keep = mis_filter(logp_old, logp_rollout, mask, traj_bounds=bounds)
    """

    def __init__(
        self,
        target_keep: float = 0.9,
        base_bounds: Tuple[float, float] = TRAJ_BAND,
        ema_decay: float = 0.9,
        min_width: Optional[float] = None,
        max_width: Optional[float] = None,
    ) -> None:
        if not 0.0 < target_keep <= 1.0:
            raise ValueError(f"target_keep must be in (0, 1], got {target_keep}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        lo0, hi0 = _check_bounds("base_bounds", base_bounds)
        if not 0.0 < lo0 < 1.0 < hi0 < math.inf:
            raise ValueError(f"base_bounds must satisfy 0 < lo < 1 < hi < inf, got {base_bounds!r}")
        self.target_keep = float(target_keep)
        self.ema_decay = float(ema_decay)
        self.log_lo0, self.log_hi0 = math.log(lo0), math.log(hi0)
        self.base_width = self.log_hi0 - self.log_lo0
        self.min_width = self.base_width if min_width is None else float(min_width)
        self.max_width = 10.0 * self.base_width if max_width is None else float(max_width)
        if not 0.0 < self.min_width <= self.max_width:
            raise ValueError(
                f"need 0 < min_width <= max_width, got min_width={self.min_width}, max_width={self.max_width}"
            )
        self.scale_ema: Optional[float] = None
        self.num_updates = 0

    @property
    def scale(self) -> float:
        """Current scale after clamping (1.0 = the base band, clamped, before any update)."""
        s = 1.0 if self.scale_ema is None else self.scale_ema
        return min(max(s, self.min_width / self.base_width), self.max_width / self.base_width)

    @property
    def bounds(self) -> Tuple[float, float]:
        """Current (lo, hi) = (exp(s log lo0), exp(s log hi0))."""
        s = self.scale
        return math.exp(s * self.log_lo0), math.exp(s * self.log_hi0)

    def required_scale(self, log_rho: Tensor) -> Tensor:
        """s_i = max(log rho_i / log lo0, log rho_i / log hi0, 0): the smallest scale keeping row i."""
        lr = log_rho.detach().float()
        return torch.maximum(lr / self.log_lo0, lr / self.log_hi0).clamp(min=0.0)

    def update_log_rho(self, log_rho: Tensor, valid: Optional[Tensor] = None) -> Tuple[float, float]:
        """Update from per-trajectory log rho [B] (``valid`` [B] marks rows to use); return bounds."""
        s_i = self.required_scale(log_rho)
        if valid is not None:
            s_i = s_i[valid.bool()]
        s_i = s_i[torch.isfinite(s_i)]
        if s_i.numel() > 0:
            s_batch = float(torch.quantile(s_i, self.target_keep, interpolation="higher"))
            if self.scale_ema is None:
                self.scale_ema = s_batch
            else:
                self.scale_ema = self.ema_decay * self.scale_ema + (1.0 - self.ema_decay) * s_batch
            self.num_updates += 1
        return self.bounds

    def update(
        self,
        logp_old: Tensor,
        logp_rollout: Tensor,
        mask: Tensor,
        token_keep: Optional[Tensor] = None,
    ) -> Tuple[float, float]:
        """Update from a rollout batch and return the new (lo, hi).

        log rho is the mean of log x_t over ``mask`` (or over ``mask & token_keep`` when given,
        matching ``traj_stat_includes_rejected=False``).
        """
        counted = mask.bool() if token_keep is None else mask.bool() & token_keep.bool()
        log_ratio = token_log_ratio(logp_old, logp_rollout, counted)
        return self.update_log_rho(sequence_log_ratio(log_ratio, counted), counted.any(dim=-1))

    def metrics(self, prefix: str = "mispo") -> Dict[str, float]:
        lo, hi = self.bounds
        return {f"{prefix}/traj_band_lo": lo, f"{prefix}/traj_band_hi": hi,
                f"{prefix}/traj_band_width": math.log(hi / lo)}

    def state_dict(self) -> Dict[str, object]:
        return {"scale_ema": self.scale_ema, "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        s = state["scale_ema"]
        self.scale_ema = None if s is None else float(s)  # type: ignore[arg-type]
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
