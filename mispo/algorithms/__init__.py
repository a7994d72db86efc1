"""MIS-PO and its baselines as pure tensor functions (no Ray, vLLM or DeepSpeed).

- filters:        mis_filter (token / trajectory MIS-PO masks), AdaptiveTrajBand
- policy_losses:  mispo, mispo_decoupled, ppo / grpo, gspo, tis, icepop, cispo: one registry (loss_spec(name))
- lag:            the lag weight of mispo_decoupled, ESS and per-lag diagnostics
- advantages:     GAE with truncation-aware bootstrap, group-normalised (GRPO, RLOO), whitening
- critic:         value_loss (masked MSE, optional value clipping)
- kl:             k1 / k2 / k3 / unbiased (DeepSeek-V3.2) estimators
- logits:         chunked entropy and token log-probs from logits
- masked:         masked reductions and loss aggregation
"""

from mispo.algorithms.advantages import (
    advantage_metrics,
    compute_gae,
    group_advantages,
    group_ids_from_size,
    last_token_index,
    outcome_to_token_rewards,
    sequence_to_token,
    whiten_advantages,
)
from mispo.algorithms.critic import value_loss
from mispo.algorithms.filters import (
    LOG_BOUND_ATOL,
    AdaptiveTrajBand,
    MISFilterResult,
    mis_filter,
    mis_filter_detailed,
    mis_filter_metrics,
    sequence_log_ratio,
    token_log_ratio,
)
from mispo.algorithms.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalty, kl_unbiased
from mispo.algorithms.logits import entropy_from_logits, logprobs_from_logits, masked_entropy
from mispo.algorithms.masked import (
    LOSS_AGG_MODES,
    aggregate_loss,
    masked_count,
    masked_mean,
    masked_std,
    masked_sum,
    masked_var,
    masked_whiten,
)
from mispo.algorithms.policy_losses import (
    LOSSES,
    LossSpec,
    PolicyLossConfig,
    PolicyLossInputs,
    cispo_loss,
    compute_policy_loss,
    get_policy_loss,
    gspo_loss,
    icepop_loss,
    loss_spec,
    mispo_decoupled_loss,
    mispo_loss,
    ppo_loss,
    register_policy_loss,
    tis_loss,
)


def metrics_to_floats(metrics):
    """{name: 0-d tensor or number} -> {name: float} (one device sync per call)."""
    return {k: float(v) for k, v in metrics.items()}


__all__ = [
    "advantage_metrics",
    "compute_gae",
    "group_advantages",
    "group_ids_from_size",
    "last_token_index",
    "outcome_to_token_rewards",
    "sequence_to_token",
    "whiten_advantages",
    "value_loss",
    "LOG_BOUND_ATOL",
    "AdaptiveTrajBand",
    "MISFilterResult",
    "mis_filter",
    "mis_filter_detailed",
    "mis_filter_metrics",
    "sequence_log_ratio",
    "token_log_ratio",
    "KL_ESTIMATORS",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "kl_unbiased",
    "entropy_from_logits",
    "logprobs_from_logits",
    "masked_entropy",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "masked_count",
    "masked_mean",
    "masked_std",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "LOSSES",
    "LossSpec",
    "PolicyLossConfig",
    "PolicyLossInputs",
    "cispo_loss",
    "compute_policy_loss",
    "get_policy_loss",
    "gspo_loss",
    "icepop_loss",
    "loss_spec",
    "mispo_decoupled_loss",
    "mispo_loss",
    "ppo_loss",
    "register_policy_loss",
    "tis_loss",
    "metrics_to_floats",
]
