"""The per-sample staleness bound of async training.

A sample's staleness is the learner's policy version when the sample reaches the loss (the number of
optimizer steps taken so far) minus `Sample.version`, the version of the weights that generated it.
Sync mode trains every sample at staleness 0; async mode (`trainer.max_staleness: s`) generates the
next s steps' rollouts while a step trains, and a sample older than s is dropped and counted, never
trained on. With partial rollouts a sample's tokens may come from several versions (`Sample.token_versions`);
its version is the oldest token's, so the bound holds for every token.
"""

from __future__ import annotations


def drop_stale(rollouts: list[tuple], learner_version: int, max_staleness: int) -> tuple[list[tuple], dict]:
    """[(domain, samples)] -> (the same with every sample of staleness > max_staleness removed, metrics):
    rollout/staleness (mean over kept samples), rollout/staleness_max, rollout/dropped_stale (count); with
    partial rollouts also rollout/token_staleness (mean over kept tokens) and rollout/partial_frac (the
    fraction of kept samples whose tokens span more than one version)."""
    kept, ages, dropped, token_ages, spanning = [], [], 0, [], 0
    for domain, samples in rollouts:
        fresh = [s for s in samples if learner_version - s.version <= max_staleness]
        dropped += len(samples) - len(fresh)
        ages += [learner_version - s.version for s in fresh]
        for s in fresh:
            if s.token_versions is not None:
                token_ages += [learner_version - v for v in s.token_versions]
                spanning += len(set(s.token_versions)) > 1
        kept.append((domain, fresh))
    metrics = {"rollout/dropped_stale": float(dropped)}
    if ages:
        metrics.update({"rollout/staleness": sum(ages) / len(ages), "rollout/staleness_max": float(max(ages))})
    if token_ages:
        metrics.update({"rollout/token_staleness": sum(token_ages) / len(token_ages),
                        "rollout/partial_frac": spanning / len(ages)})
    return kept, metrics
