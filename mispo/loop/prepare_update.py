"""The driver's math between the learners' forward and their update, a pure function of the batch and
the recipe's `algorithm:` section (testable without Ray or engines).

    advantages:  GAE (gamma, lambda; truncated responses bootstrapped from V(s_T) when
                 `bootstrap_truncated`: their reward is replaced by V(s_T), except the overlong penalty,
                 which is a reward for the length reached and stays on their last token) or
                 group-normalised sequence rewards broadcast over the response, or (reverse_kl, on-policy
                 distillation) A_t = log pi_teacher(a_t) - log pi_old(a_t) per token: minus the sampled reverse
                 KL, whose policy gradient at pi_theta = pi_old is -grad KL(pi_theta || pi_teacher) token by token
    whitening:   optional, over response tokens
    MIS-PO:      token_keep = 1[token_bounds[0] <= pi_old / pi_rollout <= token_bounds[1]] per token,
                 traj_keep  = 1[traj_bounds[0] <= geo-mean ratio <= traj_bounds[1]] per sequence
                 (geo-mean over all response tokens, or over the token-kept ones when
                 `traj_stat_includes_rejected` is false; the band adapted per step when
                 `adaptive_traj_band`); for a loss that reads pi_v (mispo_decoupled) with
                 batch.version_logprobs set, the ratio is the engine's alone, pi_v / pi_rollout
    lag:         per lag bucket (versions between sampling and training), `lag_diagnostics`
"""

from __future__ import annotations

import torch

from mispo.algorithms import AdaptiveTrajBand, compute_gae, group_advantages, whiten_advantages
from mispo.algorithms.advantages import last_token_index, outcome_to_token_rewards
from mispo.algorithms.filters import token_log_ratio
from mispo.algorithms.lag import lag_metrics, lag_weight
from mispo.algorithms.policy_losses import loss_spec
from mispo.batch import RolloutBatch
from mispo.learner.mismatch_attribution import token_versions


def adaptive_band(algorithm) -> AdaptiveTrajBand | None:
    """The trajectory band adapted per step when `algorithm.adaptive_traj_band` (it keeps about
    `adaptive_target_keep` of the trajectories, shaped like `traj_bounds`); None otherwise."""
    if not algorithm.adaptive_traj_band:
        return None
    return AdaptiveTrajBand(target_keep=algorithm.adaptive_target_keep, base_bounds=tuple(algorithm.traj_bounds))


def prepare_update(batch: RolloutBatch, algorithm, band: AdaptiveTrajBand | None = None) -> dict:
    """Set batch.advantages (and batch.returns with GAE), batch.token_keep and batch.traj_keep from
    batch.rewards, values, old_logprobs and rollout_logprobs; returns the band's metrics (if any).
    Without batch.old_logprobs (pi_old computed inside the update) the masks are left to the loss."""
    a, mask, metrics = algorithm, batch.response_mask, {}
    if a.advantage == "gae":
        truncated = batch.truncated if a.bootstrap_truncated else None
        batch.advantages, batch.returns = compute_gae(gae_rewards(batch, truncated), batch.values, mask, a.gamma, a.lam,
                                                      truncated=truncated, bootstrap_value=batch.bootstrap_values)
    elif a.advantage == "reverse_kl":
        if batch.old_logprobs is None or batch.teacher_logprobs is None:
            raise ValueError("advantage reverse_kl needs batch.old_logprobs and batch.teacher_logprobs")
        batch.advantages = (batch.teacher_logprobs - batch.old_logprobs) * mask
    else:
        seq_adv = group_advantages(batch.rewards, group_ids=batch.group_ids, method=a.advantage)
        batch.advantages = seq_adv[:, None] * mask
    if a.whiten_advantages:
        batch.advantages = whiten_advantages(batch.advantages, mask)

    if batch.old_logprobs is None:
        if band is not None:
            raise ValueError("the adaptive trajectory band needs batch.old_logprobs before the update")
        batch.token_keep = batch.traj_keep = None
        return metrics
    metrics.update(set_mispo_masks(batch, a, band))
    return metrics


def set_mispo_masks(batch: RolloutBatch, algorithm, band: AdaptiveTrajBand | None = None) -> dict:
    """Set batch.token_keep / traj_keep: MIS-PO's filters with the recipe's bands (`algorithm.bands`) on
    engine_reference / pi_rollout, the trajectory band re-chosen by the adaptive `band` when given (the one place
    the driver computes them; a fused update computes them with the same Bands); the adaptive band's metrics."""
    bands, mask, metrics = algorithm.bands, batch.response_mask, {}
    learner = engine_reference(batch, algorithm)
    if band is not None:
        token_keep = None if bands.traj_stat_includes_rejected else \
            bands.masks(learner, batch.rollout_logprobs, mask).token_keep
        bands = bands.with_traj(band.update(learner, batch.rollout_logprobs, mask, token_keep))
        metrics.update(band.metrics())
    result = bands.masks(learner, batch.rollout_logprobs, mask)
    batch.token_keep, batch.traj_keep = result.token_keep, result.traj_keep
    return metrics


def reverse_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over model tokens of log pi_student - log pi_teacher (the sampled per-token reverse KL)."""
    return float(((logp_student - logp_teacher) * mask).sum() / mask.sum().clamp(min=1))


def gae_rewards(batch: RolloutBatch, truncated: torch.Tensor | None) -> torch.Tensor:
    """GAE's rewards: the outcome [B] as it is without bootstrapping; with it, per token [B, T]: the outcome
    on the last token of finished rows, and on truncated rows only their overlong penalty (their outcome
    is replaced by V(s_T), but the penalty for the length they reached is a reward they did get)."""
    if truncated is None:
        return batch.rewards
    mask = batch.response_mask
    rewards = outcome_to_token_rewards(batch.rewards, mask, truncated)
    penalty = torch.tensor([s.overlong_penalty for s in batch.samples], dtype=torch.float32)
    penalty = torch.where(truncated.bool() & mask.bool().any(dim=-1), penalty, torch.zeros(()))
    return rewards.scatter_add(1, last_token_index(mask)[:, None], penalty[:, None])


def engine_reference(batch: RolloutBatch, algorithm) -> torch.Tensor:
    """The learner's log-probs that MIS-PO's filters compare with the engine's: pi_v (batch.version_logprobs,
    the weights that sampled each token) for a loss that reads it, else pi_old."""
    if loss_spec(algorithm.policy_loss).reads_version and batch.version_logprobs is not None:
        return batch.version_logprobs
    return batch.old_logprobs


def lag_diagnostics(batch: RolloutBatch, version: int, algorithm) -> dict[str, float]:
    """`lag/<k>/*` (mispo.algorithms.lag.lag_metrics) of a prepared batch trained at `version`: tokens k versions
    old, the share the loss trains on (MIS-PO's masks; every token for a loss without them), the ESS of the
    kept tokens' weights (mispo_decoupled's lag weight; 1 for a binary mask), |log pi_old / pi_rollout| and,
    with batch.version_logprobs, the drift |log pi_old / pi_v|. Empty without batch.old_logprobs."""
    if batch.old_logprobs is None:
        return {}
    mask = batch.response_mask.bool()
    lags = version - token_versions(batch.samples, mask.shape[1])
    keep = mask if batch.token_keep is None else batch.token_keep.bool() & batch.traj_keep.bool()[:, None] & mask
    spec, weights, drift = loss_spec(algorithm.policy_loss), None, None
    if batch.version_logprobs is not None:
        drift = token_log_ratio(batch.old_logprobs, batch.version_logprobs, mask)
        if spec.reads_version:
            weights = lag_weight(batch.old_logprobs, batch.version_logprobs, mask,
                                 algorithm.loss_config().lag_cap)
    total = token_log_ratio(batch.old_logprobs, batch.rollout_logprobs, mask)
    return lag_metrics(lags, mask, keep if spec.reads_masks else mask, weights, total, drift)
