"""Mini-batches of a batch and how the learners' per-piece metrics combine into one step's metrics."""

from __future__ import annotations

import math

import torch


def mini_batches(n: int, count: int, generator: torch.Generator) -> list[list[int]]:
    """A random split of n rows into `count` near-equal mini-batches (fewer when n < count)."""
    order = torch.randperm(n, generator=generator).tolist()
    count = max(1, min(count, n))
    size = math.ceil(n / count)
    return [order[i:i + size] for i in range(0, n, size)]


# Losses normalised by the whole mini-batch's token count: each micro-batch (and each rank) holds a
# partial sum of them, so they add up over micro-batches and ranks instead of averaging.
PARTIAL_SUM_METRICS = frozenset({"actor/pg_loss", "actor/loss", "critic/vf_loss", "actor/kl_to_old"})


def mean_metrics(parts: list[dict]) -> dict:
    """Average of each key over the dicts that have it."""
    keys = {k for p in parts for k in p}
    return {k: sum(float(p[k]) for p in parts if k in p) / sum(1 for p in parts if k in p) for k in keys}


def combine_partials(parts: list[dict]) -> dict:
    """Metrics of pieces of one whole (micro-batches of a mini-batch, or ranks' shares of it): the
    PARTIAL_SUM_METRICS are summed, every other key averaged."""
    out = mean_metrics(parts)
    for k in PARTIAL_SUM_METRICS & out.keys():
        out[k] = sum(float(p[k]) for p in parts if k in p)
    return out
