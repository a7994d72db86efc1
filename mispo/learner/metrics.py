"""Mini-batches of a batch and how the learners' per-piece metrics combine into one step's metrics.

A learner logs each micro-batch's metrics; they combine over micro-batches (`combine_partials`), then
mini-batches (`mean_metrics`), then ranks (`combine_partials`) so that the logged value is the whole
batch's, whatever the split:

    partial sums    losses divided by the whole mini-batch's token count: added up (PARTIAL_SUM_METRICS)
    counts          actor/num_tokens, actor/num_rows, critic/num_tokens: added up (COUNTS)
    maxima          keys ending in _max: the largest
    token means     weighted by the piece's response tokens (TOKEN_PREFIXES, TOKEN_METRICS)
    row means       weighted by the piece's rows with tokens (ROW_METRICS)
    adv/std         pooled (unbiased) over the pieces' counts and means
    anything else   plain average (learning rate, gradient norm, times)
"""

from __future__ import annotations

import math
import resource

import torch


def peak_rss_gib() -> float:
    """This process's resident-set high-water mark so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def mini_batches(n: int, count: int, generator: torch.Generator) -> list[list[int]]:
    """A random split of n rows into `count` near-equal mini-batches (fewer when n < count)."""
    order = torch.randperm(n, generator=generator).tolist()
    count = max(1, min(count, n))
    size = math.ceil(n / count)
    return [order[i:i + size] for i in range(0, n, size)]


# Losses normalised by the whole mini-batch's token count: each micro-batch (and each rank) holds a
# partial sum of them, so they add up over micro-batches and ranks instead of averaging.
PARTIAL_SUM_METRICS = frozenset({"actor/pg_loss", "actor/loss", "critic/vf_loss", "actor/kl_to_old"})

# The weights the losses log with their means (mispo.algorithms.policy_losses, .critic).
ACTOR_TOKENS, ACTOR_ROWS, CRITIC_TOKENS = "actor/num_tokens", "actor/num_rows", "critic/num_tokens"
COUNTS = frozenset({ACTOR_TOKENS, ACTOR_ROWS, CRITIC_TOKENS})

TOKEN_PREFIXES = ("mispo/", "mismatch/", "adv/", "ppo/", "gspo/", "tis/", "icepop/", "cispo/")
TOKEN_METRICS = {"actor/entropy": ACTOR_TOKENS, "actor/kl": ACTOR_TOKENS, "critic/value_mean": CRITIC_TOKENS,
                 "critic/return_mean": CRITIC_TOKENS, "critic/vf_clip_frac": CRITIC_TOKENS}
ROW_METRICS = frozenset({"mispo/traj_keep_frac", "mispo/log_rho_abs_mean", "gspo/seq_ratio_mean"})


def weight_of(key: str) -> str | None:
    """The count a mean metric is weighted by across pieces (None: not a weighted mean)."""
    if key in ROW_METRICS:
        return ACTOR_ROWS
    if key in TOKEN_METRICS:
        return TOKEN_METRICS[key]
    if key.startswith(TOKEN_PREFIXES):
        return ACTOR_TOKENS
    return None


def mean_metrics(parts: list[dict]) -> dict:
    """Metrics of successive wholes (mini-batches): counts add up, maxima take the largest, means are
    weighted by their counts (module docstring), every other key averaged over the dicts that have it."""
    return _combine(parts, COUNTS)


def combine_partials(parts: list[dict]) -> dict:
    """Metrics of pieces of one whole (micro-batches of a mini-batch, or ranks' shares of it): as
    `mean_metrics`, and the PARTIAL_SUM_METRICS are summed."""
    return _combine(parts, PARTIAL_SUM_METRICS | COUNTS)


def _combine(parts: list[dict], summed: frozenset) -> dict:
    """Each key over the dicts that have it: summed, max, pooled std, weighted or plain mean."""
    keys = {k for p in parts for k in p}
    out = {}
    for k in keys:
        have = [p for p in parts if k in p]
        values = [float(p[k]) for p in have]
        weight = ACTOR_TOKENS if k == "adv/std" else weight_of(k)
        weights = [float(p[weight]) for p in have] if weight and all(weight in p for p in have) else None
        if k in summed:
            out[k] = sum(values)
        elif k.endswith("_max"):
            out[k] = max(values)
        elif weights is not None and sum(weights) > 0:
            if k == "adv/std" and all("adv/mean" in p for p in have):
                out[k] = _pooled_std(weights, [float(p["adv/mean"]) for p in have], values)
            else:
                out[k] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
        else:
            out[k] = sum(values) / len(values)
    return out


def _pooled_std(counts: list[float], means: list[float], stds: list[float]) -> float:
    """The unbiased std of the union of pieces with these counts, means and unbiased stds."""
    n = sum(counts)
    if n < 2:
        return 0.0
    mean = sum(c * m for c, m in zip(counts, means)) / n
    ss = sum(max(c - 1.0, 0.0) * s * s + c * (m - mean) ** 2 for c, m, s in zip(counts, means, stds))
    return math.sqrt(ss / (n - 1.0))
