"""Mismatch attribution without a learner: which weights score which tokens, the three means, what is
left out, and which recipes may ask for it. (On the real stack: tests/trainer/test_async_e2e.py.)"""

from __future__ import annotations

import pytest
import torch

from mispo.batch import RolloutBatch, Sample
from mispo.learner.mismatch_attribution import VersionStore, attribute, attribution_metrics


def sample(n: int, version: int, token_versions=None, rollout=-1.0) -> Sample:
    return Sample(prompt_ids=[1], response_ids=list(range(n)), rollout_logprobs=[rollout] * n, loss_mask=[1] * n,
                  finish_reason="stop", version=version, token_versions=token_versions)


def scorer(calls: list, batch: RolloutBatch):
    """Weights of version v give every token log-prob -v / 10 (so |difference| = versions apart / 10);
    [rows, their longest response], as the learner's response_logprobs gives them."""
    def score(v, rows):
        calls.append((v, rows))
        return torch.full((len(rows), max(len(batch.samples[i].response_ids) for i in rows)), -v / 10)
    return score


def test_each_token_is_scored_by_the_weights_that_sampled_it_and_by_the_current_ones():
    # learner at version 3; samples of version 3 (fresh), 1 (two behind), and a partial one (tokens 2, 2, 3)
    batch = RolloutBatch.from_samples([sample(2, 3, rollout=-0.3), sample(3, 1, rollout=-0.2),
                                       sample(3, 2, token_versions=[2, 2, 3], rollout=-0.25)])
    calls = []
    metrics = attribute(batch, 3, {1, 2, 3}, scorer(calls, batch))
    assert calls == [(3, [0, 1, 2]), (1, [1]), (2, [2])]  # every row now; each older version its rows
    # per token: |now - then| = 0 (x2), 0.2 (x3), 0.1, 0.1, 0 -> mean 0.8 / 8; |then - rollout|: 0, 0.1 x3, 0.05 x2
    # and the partial sample's version-3 token 0.05; |now - rollout|: 0 x2, 0.1 x3, 0.05 x3
    assert metrics["mismatch/from_staleness"] == pytest.approx((3 * 0.2 + 2 * 0.1) / 8)
    assert metrics["mismatch/from_engine"] == pytest.approx((3 * 0.1 + 3 * 0.05) / 8)
    assert metrics["mismatch/total"] == pytest.approx((3 * 0.1 + 3 * 0.05) / 8 + 0.0)
    assert metrics["mismatch/unattributed_tokens"] == 0


def test_tokens_of_a_version_no_longer_kept_are_left_out_and_counted():
    batch = RolloutBatch.from_samples([sample(2, 5, rollout=-0.5), sample(3, 4, rollout=-0.1)])
    calls = []
    metrics = attribute(batch, 5, {5}, scorer(calls, batch))
    assert calls == [(5, [0, 1])] and metrics["mismatch/unattributed_tokens"] == 3
    assert metrics["mismatch/total"] == metrics["mismatch/from_engine"] == pytest.approx(0.0)
    assert metrics["mismatch/from_staleness"] == 0.0


def test_sync_mode_has_no_staleness_part():
    now = torch.tensor([[-1.0, -2.0]])
    rollout = torch.tensor([[-1.1, -1.7]])
    m = attribution_metrics(now, now.clone(), rollout, torch.ones(1, 2))
    assert m["mismatch/from_staleness"] == 0 and m["mismatch/from_engine"] == m["mismatch/total"] == pytest.approx(0.2)
    assert attribution_metrics(now, now, rollout, torch.zeros(1, 2)) == {}


def test_version_store_keeps_the_newest_and_copies():
    store = VersionStore(keep=1)
    w = torch.ones(2)
    for v in range(4):
        store.add(v, {"w": w * v})
    assert 3 in store and 2 in store and 1 not in store
    w.mul_(0)
    assert store[3]["w"].tolist() == [3.0, 3.0]


def test_attribution_needs_whole_weights_on_rank_0():
    from mispo.config import Recipe

    assert Recipe(name="t", trainer={"mismatch_attribution": True}).trainer.mismatch_attribution
    with pytest.raises(ValueError, match="trainer.mismatch_attribution"):
        Recipe(name="t", trainer={"mismatch_attribution": True}, learner={"zero_stage": 3})
