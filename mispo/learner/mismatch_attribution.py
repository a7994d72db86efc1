"""Where the train/inference gap comes from, step by step (`trainer.mismatch_attribution`).

A response token sampled by the engine at weights version v has the engine's log-prob r. With the learner
at version n, let p be the learner's log-prob of it at version n (what pi_old means) and q at version v:

    log p - r  =  (log p - log q)  +  (log q - r)
                   staleness          engine: precision, kernels, MoE routing, at the same weights

Logged as means of absolute values over the step's response tokens: `mismatch/total` = |log p - r|,
`mismatch/from_staleness` = |log p - log q|, `mismatch/from_engine` = |log q - r| (absolute values of a
sum: the parts need not add up to the total). In sync mode v = n and the staleness part is 0.

q needs the weights of version v: the policy learner's rank 0 keeps CPU copies of the versions a trained
sample may still come from (`VersionStore`, the last trainer.max_staleness + 1) and scores on a spare copy
of the model (`PolicyWorker.attribute_mismatch`). A token whose version is no longer kept (sampled before a
resume) is counted in `mismatch/unattributed_tokens` and left out.
"""

from __future__ import annotations

from typing import Callable, Container

import torch

from mispo.batch import RolloutBatch, Sample


class VersionStore:
    """CPU copies of the policy's weights by version, the newest `keep + 1` of them."""

    def __init__(self, keep: int):
        self.keep, self.states = keep, {}

    def add(self, version: int, state: dict[str, torch.Tensor]) -> None:
        self.states[version] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        for old in [v for v in self.states if v < version - self.keep]:
            del self.states[old]

    def __contains__(self, version: int) -> bool:
        return version in self.states

    def __getitem__(self, version: int) -> dict[str, torch.Tensor]:
        return self.states[version]


def token_versions(samples: list[Sample], length: int) -> torch.Tensor:
    """[B, length] the version that sampled each response token (-1 past a response's end)."""
    out = torch.full((len(samples), length), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        out[i, :n] = torch.tensor(s.token_versions if s.token_versions is not None else [s.version] * n)
    return out


def logprobs_at_versions(batch: RolloutBatch, version: int, kept: Container[int],
                         score: Callable[[int, list[int]], torch.Tensor] | None) -> tuple[torch.Tensor, int]:
    """(pi_v [B, T], tokens not scored): log pi_v of each response token, the learner at the weights that
    sampled it, with the learner now at `version`. Tokens sampled at `version` read batch.old_logprobs (no
    forward); older ones are scored by `score(v, rows)` (one call per kept version v, on the rows it sampled)
    when v is in `kept`. The rest (a version no longer kept, or `score` None: ZeRO-3 / expert parallelism,
    where no whole copy fits) take the engine's log-prob, pi_v ~ pi_rollout: that approximation puts all of
    their mismatch into the lag and none into the engine filter."""
    shape, mask = batch.response_mask.shape, batch.response_mask.bool()
    by_token = token_versions(batch.samples, shape[1])
    if batch.old_logprobs is None:
        raise ValueError("logprobs_at_versions needs batch.old_logprobs (the learner now, for the unlagged tokens)")
    out = torch.where(by_token == version, batch.old_logprobs.float(), batch.rollout_logprobs.float())
    unscored = mask & (by_token != version)
    for v in sorted(set(by_token[mask].tolist()) - {version}):
        here = mask & (by_token == v)
        if score is None or v not in kept:
            continue
        rows = here.any(dim=1).nonzero()[:, 0].tolist()
        values, full = score(v, rows), torch.zeros(shape)
        full[rows, : values.shape[1]] = values
        out[here] = full[here]
        unscored &= ~here
    return torch.where(mask, out, torch.zeros(())), int(unscored.sum())


def attribution_metrics(now: torch.Tensor, at_version: torch.Tensor, rollout: torch.Tensor,
                        mask: torch.Tensor) -> dict[str, float]:
    """[B, T] log p (learner, now), log q (learner, the sampling version), r (engine) and a 0/1 mask of the
    attributed tokens -> the mismatch/* means of the module docstring."""
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return {}
    mean = lambda x: float(x[m].abs().mean())  # noqa: E731
    return {"mismatch/total": mean(now - rollout), "mismatch/from_staleness": mean(now - at_version),
            "mismatch/from_engine": mean(at_version - rollout)}


def attribute(batch: RolloutBatch, version: int, kept: Container[int],
              score: Callable[[int, list[int]], torch.Tensor]) -> dict[str, float]:
    """The mismatch/* metrics of `batch` with the learner at `version`. `score(v, rows)` -> [len(rows), T_v]
    log-probs of those samples' responses under the weights of version v (T_v: their longest response);
    it is called once for `version` (every row) and once per other kept version that sampled some token."""
    shape, mask = batch.response_mask.shape, batch.response_mask.bool()
    by_token = token_versions(batch.samples, shape[1])

    def full(v: int, rows: list[int]) -> torch.Tensor:
        values, out = score(v, rows), torch.zeros(shape)
        out[rows, : values.shape[1]] = values
        return out

    now = full(version, list(range(len(batch.samples))))
    known = mask & (by_token == version)
    at_version = torch.where(known, now, torch.zeros(shape))
    for v in sorted(set(by_token[mask].tolist()) - {version}):
        here = mask & (by_token == v)
        if v in kept:
            at_version[here] = full(v, here.any(dim=1).nonzero()[:, 0].tolist())[here]
            known |= here
    metrics = attribution_metrics(now, at_version, batch.rollout_logprobs, known)
    metrics["mismatch/unattributed_tokens"] = float((mask & ~known).sum())
    return metrics
