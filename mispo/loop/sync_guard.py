"""Guards on every weight sync (learner -> rollout engines). A sync that leaves part of the engine at old
weights raises no error in vLLM: names it does not know are skipped, and layers that receive nothing keep
their tensors. These checks make that loud.

1. Names (learner side, every sync): the tensors sent must be exactly the checkpoint's tensors, the ones the
   engine loaded at start-up, same names and shapes (`mispo.weights.sync_checks.check_sent_names`).
2. Coverage (engine side, every sync, `rollout/weight_loader.py`): every engine layer with weights received
   at least one tensor.
3. Numbers (driver, after the first sync and every `trainer.sync_check_every` steps): the engine's log-probs
   of fixed token sequences equal the learner's at the same weights, within what the dtypes explain
   (`probe_tolerance`); `sync/probe_logprob_diff` is logged.
"""

from __future__ import annotations

import json
from pathlib import Path

from mispo.weights.sync_checks import WeightSyncError


def probe_tolerance(learner_dtype: str, engine_dtype: str, baseline: float | None = None) -> float:
    """The largest mean |log p_engine - log p_learner| a correct sync may show: 1e-4 with fp32 on both sides
    (two fp32 forwards agree to ~1e-6), else 5e-2 (bf16 attention and MoE kernels); never below 4x the gap
    measured before training, when the engine was loaded from the same checkpoint as the learner."""
    floor = 1e-4 if learner_dtype == engine_dtype == "float32" else 5e-2
    return max(floor, 4.0 * baseline) if baseline is not None else floor


def check_probe(diff: float, tolerance: float, family: str, when: str) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise WeightSyncError(
            f"weight sync probe ({family} family) {when}: the engine's log-probs differ from the learner's by "
            f"{diff:.3g} on average over fixed token sequences (tolerance {tolerance:.1g}); the engines are not "
            "serving the learner's weights. Likely causes: a tensor the engine did not load, a name conversion, "
            "or an engine kernel that computes another function; fix: check the family's checkpoint_state, or "
            "set trainer.sync_check_every: 0 to train anyway (not advised)")


def probe_sequences(vocab_size: int, count: int = 4, length: int = 32, seed: int = 0) -> list[list[int]]:
    """`count` fixed pseudo-random token sequences (the same for every run with this seed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=g).tolist()


def config_dict(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def mean_abs_diff(engine: list[list[float]], learner) -> float:
    """Mean |engine - learner| over every token of every probe sequence (learner: [B, >= L - 1] tensor)."""
    total, count = 0.0, 0
    for b, row in enumerate(engine):
        for t, value in enumerate(row):
            total += abs(value - float(learner[b, t]))
            count += 1
    return total / max(count, 1)


class SyncProbe:
    """Check 3, driven by the trainer: `start()` once the engines and learners are up (the gap at identical
    weights, both loaded from the same checkpoint or synced on resume), `after_sync(version)` after a sync.
    `policy.first(PolicyWorker.probe_logprobs, seqs)` and `rollout.probe_logprobs(seqs)` (one answer per engine) score."""

    def __init__(self, policy, rollout, family: str, learner_dtype: str, engine_dtype: str, vocab_size: int,
                 every: int):
        self.policy, self.rollout, self.family, self.every = policy, rollout, family, every
        self.dtypes = (learner_dtype, engine_dtype)
        self.sequences = probe_sequences(vocab_size)
        self.baseline: float | None = None
        self.synced = 0  # syncs checked so far

    def _diff(self) -> float:
        from mispo.learner.policy_worker import PolicyWorker

        learner = self.policy.first(PolicyWorker.probe_logprobs, self.sequences)
        return max(mean_abs_diff(engine, learner) for engine in self.rollout.probe_logprobs(self.sequences))

    def start(self) -> dict[str, float]:
        """The gap before any update; fp32 on both sides must already agree (else the kernels differ)."""
        if not self.every:
            return {}
        self.baseline = self._diff()
        if self.dtypes == ("float32", "float32"):
            check_probe(self.baseline, probe_tolerance(*self.dtypes), self.family, "before training (same weights "
                        "on both sides, loaded from the same checkpoint)")
        return {"sync/probe_logprob_diff": self.baseline}

    def after_sync(self, version: int) -> dict[str, float]:
        """Probe after the first sync and every `every` versions after it; {} when this sync is not probed."""
        if not self.every or (self.synced and version % self.every):
            return {}
        self.synced += 1
        diff = self._diff()
        check_probe(diff, probe_tolerance(*self.dtypes, self.baseline), self.family, f"after the sync of version "
                    f"{version} (before training: {self.baseline:.3g})" if self.baseline is not None else
                    f"after the sync of version {version}")
        return {"sync/probe_logprob_diff": diff}


def fp32_sync_warning(metrics: dict, mode: str, dtypes: tuple[str, str]) -> str | None:
    """The warning for a sync-mode run with fp32 on both sides whose mean |log pi_old / pi_rollout| is above
    1e-3 (two fp32 forwards at the same weights agree to ~1e-6), else None."""
    value = metrics.get("mismatch/log_ratio_abs_mean")
    if mode != "sync" or dtypes != ("float32", "float32") or value is None or value <= 1e-3:
        return None
    return (f"mean |log pi_old / pi_rollout| = {value:.3g} in sync mode with fp32 on both sides, where ~1e-6 is "
            "expected: the engine is not sampling the policy the learner scores. Likely causes: a weight sync that "
            "missed tensors, sampling parameters the learner does not model (rollout.top_p, top_k), or an engine "
            "kernel that differs from the learner's")
