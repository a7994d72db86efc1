"""Actor losses: MIS-PO and the baselines it is compared with, behind one interface.

Every loss is ``fn(inputs: PolicyLossInputs, config: PolicyLossConfig) -> (loss, metrics)``:
a per-token loss l_t [B, T] is reduced by :func:`~mispo.algorithms.masked.aggregate_loss` over
the response mask (``config.loss_agg``), then the optional KL and entropy terms are added:

    loss = agg(l) + kl_coef * agg(kl_t) - entropy_coef * agg(H_t)

Notation: r_t = pi_theta / pi_old = exp(logp - logp_old) (the update ratio),
x_t = pi_old / pi_rollout = exp(logp_old - logp_rollout) (train-vs-inference ratio), A_t the
advantage, eps_l / eps_h the clip range. Only ``logp`` carries a gradient; everything else is
detached. Work is done in fp32; positions outside ``mask`` are read through ``torch.where``, so
nan/inf padding leaves the loss and the gradient untouched.

Metrics are detached 0-d fp32 tensors (no device sync; call ``float()`` when logging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from mispo.algorithms.filters import (
    LOG_BOUND_ATOL,
    _check_bounds,
    _in_band,
    mis_filter_metrics,
    token_log_ratio,
)
from mispo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from mispo.bands import Bands
from mispo.algorithms.masked import LOSS_AGG_MODES, aggregate_loss, masked_mean, masked_std

Metrics = Dict[str, Tensor]
PolicyLossFn = Callable[["PolicyLossInputs", "PolicyLossConfig"], Tuple[Tensor, Metrics]]

_CLAMP = 20.0


@dataclass
class PolicyLossInputs:
    """What every policy loss reads. Shapes [B, T] unless stated.

    logp:         log pi_theta(a_t|s_t), with grad (fp32 or bf16).
    logp_old:     log pi_old (the learner at the rollout's weights, no grad).
    advantages:   A_t [B, T], or per sequence [B] (broadcast over the row).
    mask:         generated tokens that count (no prompt / padding / env tokens).
    logp_rollout: log pi_rollout from the inference engine (MIS-PO, TIS, IcePop; else metrics).
    logp_ref:     reference policy (KL term / metric).
    entropy:      per-token entropy H_t (metric; with grad if entropy_coef > 0).
    logp_version: log pi_v, the learner at the weights that sampled each token (mispo_decoupled; None =
                  logp_old, i.e. no lag).
    token_keep, traj_keep: MIS-PO masks [B, T] / [B] computed once per rollout batch (e.g. with
                  an adaptive band); when None, MIS-PO computes them from logp_old (mispo_decoupled:
                  logp_version) and logp_rollout.
    num_tokens, num_seqs: mini-batch totals for the loss denominator (see aggregate_loss).
    """

    logp: Tensor
    logp_old: Tensor
    advantages: Tensor
    mask: Tensor
    logp_rollout: Optional[Tensor] = None
    logp_ref: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    logp_version: Optional[Tensor] = None
    token_keep: Optional[Tensor] = None
    traj_keep: Optional[Tensor] = None
    num_tokens: Optional[float] = None
    num_seqs: Optional[float] = None

    def __post_init__(self) -> None:
        shape = tuple(self.mask.shape)
        if len(shape) != 2:
            raise ValueError(f"PolicyLossInputs.mask must be [B, T], got {shape}")
        for name in ("logp", "logp_old", "logp_rollout", "logp_ref", "entropy", "logp_version", "token_keep"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"PolicyLossInputs.{name} has shape {tuple(t.shape)}, mask has {shape}")
        if tuple(self.advantages.shape) not in (shape, shape[:1]):
            raise ValueError(
                f"PolicyLossInputs.advantages must be [B, T] = {shape} or [B], "
                f"got {tuple(self.advantages.shape)}"
            )
        if self.traj_keep is not None and tuple(self.traj_keep.shape) != shape[:1]:
            raise ValueError(
                f"PolicyLossInputs.traj_keep must be [B] = {shape[:1]}, got {tuple(self.traj_keep.shape)}"
            )
        if (self.token_keep is None) != (self.traj_keep is None):
            raise ValueError("PolicyLossInputs: give both token_keep and traj_keep, or neither")


@dataclass
class PolicyLossConfig:
    """Options of all policy losses (each loss reads its own; defaults from the sources).

    loss_agg: "token-mean" (default: over all response tokens, so MIS-PO's rejected tokens
        shrink the step), "seq-mean-token-mean", or "token-sum-norm" (Dr.GRPO, divided by
        ``norm_length``, which should be the generation max length).
    MIS-PO: bands, a `mispo.bands.Bands` (default: the report's TOKEN_BAND (0.5, 2), TRAJ_BAND (0.996, 1.001),
        rho over all generated tokens); the trainer passes `algorithm.bands`.
    PPO / GRPO / TIS / IcePop: clip_eps_low = clip_eps_high = 0.2; dual_clip_c 3.0 (None: off).
    GSPO: gspo_eps_low 3e-4, gspo_eps_high 4e-4 (the GSPO paper).
    TIS: tis_cap C = 2.0.  IcePop: icepop_bounds (0.5, 5.0).
    mispo_decoupled: lag_cap C = 2.0 (the lag weight min(pi_old / pi_v, C), mispo.algorithms.lag);
        decoupled_clip eps None (off: the report's loss, no clip) or a PPO clip of pi_theta / pi_old at
        [1 - eps, 1 + eps] around the proximal policy pi_old (AReaL's decoupled objective).
    CISPO: cispo_eps_high 0.28 (MiniMax-M1 gives no number; DAPO's clip-higher value, tune it),
        cispo_eps_low None (no lower clip, as in MiniMax-M1).
    kl_coef 0.0 (the report uses 0.001 in its final stage), kl_estimator "unbiased" (or k1/k2/k3).
    entropy_coef 0.0.
    """

    loss_agg: str = "token-mean"
    norm_length: Optional[float] = None
    bands: Bands = Bands()
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: Optional[float] = 3.0
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    tis_cap: float = 2.0
    lag_cap: float = 2.0
    decoupled_clip: Optional[float] = None
    icepop_bounds: Tuple[float, float] = (0.5, 5.0)
    cispo_eps_low: Optional[float] = None
    cispo_eps_high: float = 0.28
    kl_coef: float = 0.0
    kl_estimator: str = "unbiased"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg={self.loss_agg!r} is not one of {LOSS_AGG_MODES}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
        self.icepop_bounds = _check_bounds("icepop_bounds", self.icepop_bounds)
        for name in ("clip_eps_low", "clip_eps_high", "gspo_eps_low", "gspo_eps_high", "cispo_eps_high",
                     "kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (None turns dual clip off), got {self.dual_clip_c}")
        if self.decoupled_clip is not None and not 0 < self.decoupled_clip < 1:
            raise ValueError(f"decoupled_clip must be in (0, 1) (None turns it off), got {self.decoupled_clip}")
        for name in ("tis_cap", "lag_cap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"norm_length must be > 0, got {self.norm_length}")


# ----------------------------------------------------------------------------------------------
# helpers


def _zero(device) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)


def _prep(inputs: PolicyLossInputs) -> Tuple[Tensor, Tensor, Tensor]:
    """(mask bool, logp fp32 with 0 outside mask, advantages fp32 [B, T] detached, 0 outside)."""
    m = inputs.mask.bool()
    z = _zero(m.device)
    logp = torch.where(m, inputs.logp.float(), z)
    adv = inputs.advantages.detach().float()
    if adv.dim() == 1:
        adv = adv[:, None].expand(m.shape)
    adv = torch.where(m, adv, z)
    return m, logp, adv


def _update_log_ratio(logp: Tensor, inputs: PolicyLossInputs, m: Tensor) -> Tensor:
    """log r_t = logp - logp_old (grad through logp), 0 outside mask, clamped to +-20."""
    old = torch.where(m, inputs.logp_old.detach().float(), _zero(m.device))
    return torch.where(m, logp - old, _zero(m.device)).clamp(-_CLAMP, _CLAMP)


def _rollout_log_ratio(inputs: PolicyLossInputs, m: Tensor, who: str) -> Tensor:
    if inputs.logp_rollout is None:
        raise ValueError(f"{who} needs PolicyLossInputs.logp_rollout (the inference engine's logprobs)")
    return token_log_ratio(inputs.logp_old, inputs.logp_rollout, m)


def _ppo_clip(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
              dual_c: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """PPO-clip per-token loss with optional dual clip -> (loss, clipped, dual_clipped).

    l = max(-A r, -A clip(r, 1 - eps_l, 1 + eps_h));  dual clip (A < 0): l = min(l, -A c).
    """
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    dual = torch.zeros_like(clipped)
    if dual_c is not None:
        l3 = -adv * dual_c
        dual = (adv < 0) & (loss > l3)
        loss = torch.where(adv < 0, torch.minimum(loss, l3), loss)
    return loss, clipped, dual


def _mismatch_metrics(inputs: PolicyLossInputs, m: Tensor) -> Metrics:
    """Train-vs-inference gap |log x_t| = |log pi_old - log pi_rollout| over the response tokens (mean, max)
    when logp_rollout is given; every loss logs it under this one name."""
    if inputs.logp_rollout is None:
        return {}
    a = token_log_ratio(inputs.logp_old, inputs.logp_rollout, m).abs()
    return {"mismatch/log_ratio_abs_mean": masked_mean(a, m),
            "mismatch/log_ratio_abs_max": a.amax() if a.numel() else _zero(m.device)}


def _finish(pg_mat: Tensor, inputs: PolicyLossInputs, config: PolicyLossConfig, m: Tensor, logp: Tensor,
            adv: Tensor, metrics: Metrics, reg_weight: Optional[Tensor] = None) -> Tuple[Tensor, Metrics]:
    """Aggregate, add KL / entropy terms (weighted by ``reg_weight`` when given), fill metrics."""
    agg = dict(mode=config.loss_agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs,
               norm_length=config.norm_length)
    pg_loss = aggregate_loss(pg_mat, m, **agg)
    loss = pg_loss
    z = _zero(m.device)
    if inputs.logp_ref is not None:
        kl_mat = kl_penalty(config.kl_estimator, logp, inputs.logp_ref, inputs.logp_old, m)
        metrics["actor/kl"] = masked_mean(kl_mat.detach(), m)
        if config.kl_coef > 0:
            w = kl_mat if reg_weight is None else torch.where(reg_weight, kl_mat, z)
            loss = loss + config.kl_coef * aggregate_loss(w, m, **agg)
    elif config.kl_coef > 0:
        raise ValueError("kl_coef > 0 needs PolicyLossInputs.logp_ref (the reference policy's logprobs)")
    if inputs.entropy is not None:
        ent = torch.where(m, inputs.entropy.float(), z)
        metrics["actor/entropy"] = masked_mean(ent.detach(), m)
        if config.entropy_coef > 0:
            w = ent if reg_weight is None else torch.where(reg_weight, ent, z)
            loss = loss - config.entropy_coef * aggregate_loss(w, m, **agg)
    elif config.entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs PolicyLossInputs.entropy (per-token entropy with grad)")
    metrics["actor/pg_loss"] = pg_loss.detach()
    metrics["actor/loss"] = loss.detach()
    metrics["adv/mean"] = masked_mean(adv, m)
    metrics["adv/std"] = masked_std(adv, m)
    metrics.update(_mismatch_metrics(inputs, m))
    # the weights that combine these means over micro-batches and ranks (mispo.learner.metrics)
    metrics["actor/num_tokens"] = m.sum().float()
    metrics["actor/num_rows"] = m.any(dim=-1).sum().float()
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# losses


def mispo_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """MIS-PO: l_t = -I(x_t in token band) * I(rho in traj band) * logp_t * A_t.

    Binary, detached masks (no ratio, no clip). Masks come from ``inputs.token_keep/traj_keep``
    when given, else from ``config.bands.masks`` (mispo.bands). The KL and
    entropy terms are masked the same way: a rejected sample contributes nothing.
    """
    return _masked_policy_gradient(inputs, config, inputs.logp_old, None)


def mispo_decoupled_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """Staleness-aware MIS-PO: the report's filters on the engine mismatch e_t = pi_v / pi_rollout (pi_v: the
    learner at the weights that sampled token t), the lag g_t = pi_old / pi_v corrected by a truncated weight:

        l_t = -I(e_t in token band) * I(geo-mean e in traj band) * min(g_t, lag_cap) * logp_t * A_t

    Without ``logp_version`` (or with pi_v = pi_old: no lag) g_t = 1 and this is :func:`mispo_loss` exactly.
    With ``decoupled_clip`` eps the update is also held near pi_old (AReaL's decoupled PPO), r_t = pi_theta / pi_old:
        l_t = keep_t * min(g_t, lag_cap) * max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))
    whose gradient at r = 1 (a step's first mini-batch) is the unclipped loss's; later mini-batches stop moving
    a token once its ratio leaves the interval in the advantage's direction.
    """
    from mispo.algorithms.lag import effective_sample_size, lag_weight

    m = inputs.mask.bool()
    clip = config.decoupled_clip
    if inputs.logp_version is None:
        return _masked_policy_gradient(inputs, config, inputs.logp_old, None, clip)
    weight = lag_weight(inputs.logp_old, inputs.logp_version, m, config.lag_cap)
    loss, metrics = _masked_policy_gradient(inputs, config, inputs.logp_version, weight, clip)
    with torch.no_grad():
        log_g = token_log_ratio(inputs.logp_old, inputs.logp_version, m)
        metrics["lag/weight_mean"] = masked_mean(weight, m)
        metrics["lag/capped_frac"] = masked_mean((log_g > math.log(config.lag_cap)).float(), m)
        metrics["lag/log_ratio_abs_mean"] = masked_mean(log_g.abs(), m)
        metrics["lag/ess"] = effective_sample_size(weight, m)
    return loss, metrics


def _masked_policy_gradient(inputs: PolicyLossInputs, config: PolicyLossConfig, engine_reference: Tensor,
                            weight: Optional[Tensor], clip: Optional[float] = None) -> Tuple[Tensor, Metrics]:
    """l_t = -keep_t * w_t * logp_t * A_t with keep = MIS-PO's masks of engine_reference / pi_rollout (or the
    precomputed ones), w_t = ``weight`` (None: 1, the report's loss exactly); with ``clip`` eps, -logp_t A_t
    becomes PPO's max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)), r_t = pi_theta / pi_old."""
    m, logp, adv = _prep(inputs)
    metrics: Metrics = {}
    with torch.no_grad():
        if inputs.token_keep is None:
            if inputs.logp_rollout is None:
                raise ValueError(
                    "MIS-PO needs PolicyLossInputs.logp_rollout, or precomputed token_keep/traj_keep"
                )
            res = config.bands.masks(engine_reference, inputs.logp_rollout, m)
            token_keep, traj_keep = res.token_keep, res.traj_keep
            metrics.update(mis_filter_metrics(res, m))
        else:
            token_keep, traj_keep = inputs.token_keep.bool() & m, inputs.traj_keep.bool()
            rows = m.any(dim=-1)
            metrics["mispo/token_keep_frac"] = masked_mean(token_keep.float(), m)
            metrics["mispo/traj_keep_frac"] = masked_mean(traj_keep.float(), rows)
            metrics["mispo/keep_frac"] = masked_mean((token_keep & traj_keep[:, None]).float(), m)
        keep = token_keep & traj_keep[:, None] & m
    z = _zero(m.device)
    if clip is None:
        weighted = logp if weight is None else weight * logp
        pg_mat = -(torch.where(keep, weighted, z) * torch.where(keep, adv, z))
    else:
        ratio = torch.exp(_update_log_ratio(logp, inputs, m))
        clipped_loss, clipped, _ = _ppo_clip(ratio, adv, clip, clip, None)
        pg_mat = torch.where(keep, clipped_loss if weight is None else weight * clipped_loss, z)
        metrics["ppo/clip_frac"] = masked_mean(clipped.float(), keep)
    return _finish(pg_mat, inputs, config, m, logp, adv, metrics, reg_weight=keep)


def ppo_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """PPO-clip with dual clip: l_t = max(-A r, -A clip(r, 1-eps_l, 1+eps_h)), and for A < 0
    l_t = min(l_t, -A c).  GRPO is this loss with group-normalised advantages."""
    m, logp, adv = _prep(inputs)
    log_r = _update_log_ratio(logp, inputs, m)
    ratio = torch.exp(log_r)
    pg_mat, clipped, dual = _ppo_clip(ratio, adv, config.clip_eps_low, config.clip_eps_high,
                                      config.dual_clip_c)
    with torch.no_grad():
        metrics: Metrics = {
            "ppo/clip_frac": masked_mean(clipped.float(), m),
            "ppo/dual_clip_frac": masked_mean(dual.float(), m),
            "ppo/ratio_mean": masked_mean(ratio.detach(), m),
            "ppo/approx_kl": masked_mean((ratio - 1.0 - log_r).detach(), m),
        }
    return _finish(pg_mat, inputs, config, m, logp, adv, metrics)


def gspo_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """GSPO (token form): s = exp(mean_t log r_t) per sequence; s_t = sg(s) * pi_theta / sg(pi_theta);
    l_t = max(-A s_t, -A clip(s_t, 1-eps_l, 1+eps_h)) with GSPO's narrow clip range.

    The value of s_t is s and its gradient that of s * log pi_theta(a_t): for a per-sequence
    advantage this is exactly GSPO; per-token advantages give GSPO-token.
    """
    m, logp, adv = _prep(inputs)
    log_r = _update_log_ratio(logp, inputs, m)
    log_s = masked_mean(log_r, m, dim=-1).detach()
    log_st = (log_s[:, None] + logp - logp.detach()).clamp(-_CLAMP, _CLAMP)
    ratio = torch.exp(log_st)
    pg_mat, clipped, _ = _ppo_clip(ratio, adv, config.gspo_eps_low, config.gspo_eps_high, None)
    with torch.no_grad():
        rows = m.any(dim=-1)
        metrics: Metrics = {
            "gspo/clip_frac": masked_mean(clipped.float(), m),
            "gspo/seq_ratio_mean": masked_mean(torch.exp(log_s), rows),
        }
    return _finish(pg_mat, inputs, config, m, logp, adv, metrics)


def tis_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """TIS: l_t = min(x_t, C) * l_t^PPO  (truncated importance weight for the rollout mismatch)."""
    m, logp, adv = _prep(inputs)
    x = torch.exp(_rollout_log_ratio(inputs, m, "TIS").clamp(-_CLAMP, _CLAMP))
    w = torch.where(m, x.clamp(max=config.tis_cap), _zero(m.device))
    log_r = _update_log_ratio(logp, inputs, m)
    pg_mat, clipped, _ = _ppo_clip(torch.exp(log_r), adv, config.clip_eps_low, config.clip_eps_high,
                                   config.dual_clip_c)
    with torch.no_grad():
        metrics: Metrics = {
            "ppo/clip_frac": masked_mean(clipped.float(), m),
            "tis/weight_mean": masked_mean(w, m),
            "tis/capped_frac": masked_mean((x > config.tis_cap).float(), m),
        }
    return _finish(w * pg_mat, inputs, config, m, logp, adv, metrics)


def icepop_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """IcePop / masked IS: l_t = w_t * l_t^PPO, w_t = x_t if a <= x_t <= b else 0."""
    m, logp, adv = _prep(inputs)
    lx = _rollout_log_ratio(inputs, m, "IcePop")
    inside = m & _in_band(lx, config.icepop_bounds, LOG_BOUND_ATOL)
    w = torch.where(inside, torch.exp(lx.clamp(-_CLAMP, _CLAMP)), _zero(m.device))
    log_r = _update_log_ratio(logp, inputs, m)
    ratio = torch.exp(log_r)
    pg_mat, clipped, _ = _ppo_clip(ratio, adv, config.clip_eps_low, config.clip_eps_high, config.dual_clip_c)
    pg_mat = torch.where(inside, w * pg_mat, _zero(m.device))
    with torch.no_grad():
        metrics: Metrics = {
            "ppo/clip_frac": masked_mean(clipped.float(), m),
            "icepop/keep_frac": masked_mean(inside.float(), m),
            "icepop/weight_mean": masked_mean(w, m),
        }
    return _finish(pg_mat, inputs, config, m, logp, adv, metrics)


def cispo_loss(inputs: PolicyLossInputs, config: PolicyLossConfig) -> Tuple[Tensor, Metrics]:
    """CISPO: l_t = -sg(clip(r_t, 1 - eps_l, 1 + eps_h)) * A_t * logp_t (no lower clip if eps_l None)."""
    m, logp, adv = _prep(inputs)
    with torch.no_grad():
        ratio = torch.exp(_update_log_ratio(logp, inputs, m))
        lo = 0.0 if config.cispo_eps_low is None else 1.0 - config.cispo_eps_low
        hi = 1.0 + config.cispo_eps_high
        w = torch.where(m, ratio.clamp(lo, hi), _zero(m.device))
        metrics: Metrics = {
            "cispo/clip_frac": masked_mean(((ratio < lo) | (ratio > hi)).float(), m),
            "cispo/weight_mean": masked_mean(w, m),
        }
    return _finish(-w * adv * logp, inputs, config, m, logp, adv, metrics)


# ----------------------------------------------------------------------------------------------
# registry: each loss declared once

_CLIP = ("clip_eps_low", "clip_eps_high", "dual_clip_c")


@dataclass(frozen=True)
class LossSpec:
    """One policy loss and what it reads, declared once (the recipe's validation and the trainer ask here).

    options:       the PolicyLossConfig fields beyond the shared ones (loss_agg, norm_length, kl_coef,
                   kl_estimator, entropy_coef) that a recipe's ``algorithm.loss_options`` may set for it.
    reads_rollout: it corrects each token against the engine's log-prob (logp_rollout): its update stays
                   right when a sample's tokens come from several weight versions (partial rollouts), and
                   rollout.top_p < 1 would bias it.
    reads_masks:   it reads MIS-PO's token / trajectory masks (algorithm.token_bounds, traj_bounds, the
                   adaptive band).
    reads_version: it reads logp_version, the learner at the weights that sampled each token.
    default_agg:   the aggregation it was published with (a recipe's algorithm.loss_agg overrides it).
    """

    fn: PolicyLossFn
    options: Tuple[str, ...] = ()
    reads_rollout: bool = False
    reads_masks: bool = False
    reads_version: bool = False
    default_agg: str = "token-mean"


LOSSES: Dict[str, LossSpec] = {}


def register_policy_loss(*names: str, **spec) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make ``fn`` available under ``names`` (keyword arguments: the LossSpec fields)."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        for name in names:
            LOSSES[name.lower()] = LossSpec(fn, **spec)
        return fn

    return deco


for _names, _fn, _spec in (
        (("mispo", "mis-po"), mispo_loss, dict(reads_rollout=True, reads_masks=True)),
        (("mispo_decoupled",), mispo_decoupled_loss,
         dict(options=("lag_cap", "decoupled_clip"), reads_rollout=True, reads_masks=True, reads_version=True)),
        (("ppo", "grpo"), ppo_loss, dict(options=_CLIP)),
        (("gspo",), gspo_loss, dict(options=("gspo_eps_low", "gspo_eps_high"), default_agg="seq-mean-token-mean")),
        (("tis",), tis_loss, dict(options=("tis_cap", *_CLIP), reads_rollout=True)),
        (("icepop", "masked_is"), icepop_loss, dict(options=("icepop_bounds", *_CLIP), reads_rollout=True)),
        (("cispo",), cispo_loss, dict(options=("cispo_eps_low", "cispo_eps_high")))):
    register_policy_loss(*_names, **_spec)(_fn)


def loss_spec(name: str) -> LossSpec:
    """The loss registered as ``name``: mispo, mispo_decoupled, ppo, grpo (= ppo), gspo, tis, icepop, cispo, ..."""
    try:
        return LOSSES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


def get_policy_loss(name: str) -> PolicyLossFn:
    """The function of the loss registered as ``name``."""
    return loss_spec(name).fn


def compute_policy_loss(name: str, inputs: PolicyLossInputs,
                        config: Optional[PolicyLossConfig] = None) -> Tuple[Tensor, Metrics]:
    """``get_policy_loss(name)(inputs, config or PolicyLossConfig())``."""
    return get_policy_loss(name)(inputs, config if config is not None else PolicyLossConfig())
