"""Staleness-aware MIS-PO (mispo_decoupled): the report's loss exactly with no lag, and the lag weight and the
engine-only filters against hand computations on a batch with known versions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.algorithms import PolicyLossConfig, PolicyLossInputs, compute_policy_loss, loss_spec
from mispo.algorithms.lag import effective_sample_size, lag_buckets, lag_weight
from mispo.bands import Bands
from mispo.batch import RolloutBatch, Sample
from mispo.learner.mismatch_attribution import logprobs_at_versions
from mispo.loop.prepare_update import lag_diagnostics, prepare_update

from tests.algorithms.test_policy_losses import make_batch


def _loss(name, b, **kw):
    logp = b["theta"].clone().requires_grad_(True)
    inputs = PolicyLossInputs(logp=logp, logp_old=b["old"], advantages=b["adv"], mask=b["mask"],
                              logp_rollout=b["roll"], **kw)
    loss, metrics = compute_policy_loss(name, inputs)
    loss.backward()
    return loss.detach(), logp.grad, metrics


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), gap=st.sampled_from([0.0, 1e-3, 0.3, 2.0]), drift=st.sampled_from([0.0, 0.2]))
def test_with_no_lag_it_is_the_reports_mispo_bit_for_bit(seed, gap, drift):
    b = make_batch(seed=seed, gap=gap, drift=drift)
    want_loss, want_grad, want_metrics = _loss("mispo", b)
    for kw in ({}, {"logp_version": b["old"].clone()}):  # no pi_v given, or pi_v = pi_old (sync mode)
        loss, grad, metrics = _loss("mispo_decoupled", b, **kw)
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
        for k, v in want_metrics.items():
            assert torch.equal(metrics[k], v), k


def test_the_lag_weight_and_the_engine_filter_against_a_hand_computation():
    # one row, four tokens; learner now (pi_old), at the sampling weights (pi_v), engine (pi_rollout)
    old = torch.log(torch.tensor([[0.50, 0.40, 0.20, 0.30]]))
    version = torch.log(torch.tensor([[0.25, 0.40, 0.40, 0.30]]))  # lag ratios g = 2.0 (capped at 1.5), 1, 0.5, 1
    rollout = version.clone()
    rollout[0, 3] = math.log(0.30 * 4)  # engine ratio e = pi_v / pi_rollout = 1/4: outside [0.5, 2], dropped
    logp = torch.log(torch.tensor([[0.55, 0.35, 0.25, 0.30]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    config = PolicyLossConfig(lag_cap=1.5, bands=Bands(traj=(0.0, math.inf)))  # the trajectory band out of the way
    loss, metrics = compute_policy_loss("mispo_decoupled", PolicyLossInputs(
        logp=logp, logp_old=old, advantages=adv, mask=mask, logp_rollout=rollout, logp_version=version), config)
    loss.backward()
    w = torch.tensor([1.5, 1.0, 0.5, 0.0])  # min(g, 1.5), and 0 where the engine filter drops the token
    assert loss.item() == pytest.approx(float(-(w * logp.detach()[0] * adv[0]).sum() / 4), rel=1e-6)
    assert torch.allclose(logp.grad[0], -w * adv[0] / 4)
    assert metrics["mispo/token_keep_frac"].item() == pytest.approx(0.75)
    assert metrics["lag/capped_frac"].item() == pytest.approx(0.25)
    assert metrics["lag/weight_mean"].item() == pytest.approx((1.5 + 1 + 0.5 + 1) / 4)
    # the report's MIS-PO on the same batch filters on pi_old / pi_rollout: tokens 0 (ratio 2) and 2 (0.5) sit on
    # the band's edges, token 3 leaves it; it trains the kept ones with weight 1
    _, plain = compute_policy_loss("mispo", PolicyLossInputs(
        logp=logp.detach(), logp_old=old, advantages=adv, mask=mask, logp_rollout=rollout), config)
    assert plain["mispo/token_keep_frac"].item() == pytest.approx(0.75)


def test_the_decoupled_clip_against_a_hand_computation():
    """decoupled_clip eps: PPO's clip of r = pi_theta / pi_old on top of the lag weight and the engine filter.
    Same batch as above; r = 1.1, 0.875, 1.25, 1.0: token 0 (A > 0, r inside [0.8, 1.2]) keeps its gradient
    w A r; token 1 (A < 0, r = 0.875 inside) too; token 2 (A > 0, r = 1.25 above 1.2) is clipped: no gradient;
    token 3 is dropped by the engine filter."""
    old = torch.log(torch.tensor([[0.50, 0.40, 0.20, 0.30]]))
    version = torch.log(torch.tensor([[0.25, 0.40, 0.40, 0.30]]))
    rollout = version.clone()
    rollout[0, 3] = math.log(0.30 * 4)
    theta = torch.tensor([[0.55, 0.35, 0.25, 0.30]])
    logp = torch.log(theta).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    config = PolicyLossConfig(lag_cap=1.5, bands=Bands(traj=(0.0, math.inf)), decoupled_clip=0.2)
    loss, metrics = compute_policy_loss("mispo_decoupled", PolicyLossInputs(
        logp=logp, logp_old=old, advantages=adv, mask=mask, logp_rollout=rollout, logp_version=version), config)
    loss.backward()
    w = torch.tensor([1.5, 1.0, 0.5, 0.0])
    r = (theta / old.exp())[0]
    per_token = torch.maximum(-adv[0] * r, -adv[0] * r.clamp(0.8, 1.2))
    assert loss.item() == pytest.approx(float((w * per_token).sum() / 4), rel=1e-6)
    want = -w * adv[0] * r * torch.tensor([1.0, 1.0, 0.0, 1.0]) / 4  # d(-A r)/d logp = -A r; clipped: 0
    assert torch.allclose(logp.grad[0], want, atol=1e-7)
    assert metrics["ppo/clip_frac"].item() == pytest.approx(1 / 3)  # of the kept tokens
    # at r = 1 (a step's first mini-batch) the clipped loss's gradient is the unclipped one's
    at_old = old.clone().requires_grad_(True)
    unclipped = old.clone().requires_grad_(True)
    for x, cfg in ((at_old, config), (unclipped, PolicyLossConfig(lag_cap=1.5, bands=Bands(traj=(0.0, math.inf))))):
        compute_policy_loss("mispo_decoupled", PolicyLossInputs(
            logp=x, logp_old=old, advantages=adv, mask=mask, logp_rollout=rollout, logp_version=version),
            cfg)[0].backward()
    assert torch.allclose(at_old.grad, unclipped.grad)
    with pytest.raises(ValueError, match="decoupled_clip"):
        PolicyLossConfig(decoupled_clip=1.5)


def test_lag_weight_ess_and_buckets():
    mask = torch.tensor([[True, True, False]])
    w = lag_weight(torch.log(torch.tensor([[0.9, 0.2, 0.5]])), torch.log(torch.tensor([[0.3, 0.4, 0.5]])), mask, 2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 0.0]]))
    assert effective_sample_size(w, mask).item() == pytest.approx(2.5 ** 2 / (2 * 4.25))
    assert effective_sample_size(torch.ones(1, 3), mask).item() == pytest.approx(1.0)
    lags = torch.tensor([[0, 1, 5], [6, 2, 2]])
    buckets = lag_buckets(lags, torch.ones(2, 3, dtype=torch.bool))
    assert sorted(buckets) == ["0", "1", "2", "4+"] and int(buckets["4+"].sum()) == 2


def _sample(version, n, token_versions=None):
    return Sample(prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)), rollout_logprobs=[-1.0] * n,
                  loss_mask=[1] * n, finish_reason="stop", version=version, token_versions=token_versions)


def test_logprobs_at_versions_scores_each_stale_token_at_its_own_weights():
    batch = RolloutBatch.from_samples([_sample(5, 2), _sample(3, 3), _sample(2, 2, token_versions=[2, 4]),
                                       _sample(1, 1)])
    batch.old_logprobs = torch.full(batch.response_mask.shape, -0.5)
    calls = []

    def score(v, rows):  # log-prob -v on each scored row, as long as the longest of those rows
        calls.append((v, rows))
        return torch.full((len(rows), 3), -float(v))

    values, unscored = logprobs_at_versions(batch, 5, kept={2, 3, 4, 5}, score=score)
    assert sorted(calls) == [(2, [2]), (3, [1]), (4, [2])]  # version 5 = now: pi_old, no forward
    assert values[0, :2].tolist() == [-0.5, -0.5]
    assert values[1].tolist() == [-3.0, -3.0, -3.0]
    assert values[2, :2].tolist() == [-2.0, -4.0]  # a partial rollout: each token at its own version
    assert values[3, 0].item() == -1.0 and unscored == 1  # version 1 is no longer kept: the engine's log-prob
    assert values[0, 2].item() == 0.0  # padding
    approx, unscored = logprobs_at_versions(batch, 5, kept=(), score=None)  # ZeRO-3 / EP: pi_v ~ pi_rollout
    assert approx[1].tolist() == [-1.0, -1.0, -1.0] and approx[0, :2].tolist() == [-0.5, -0.5] and unscored == 6


def test_prepare_update_filters_on_the_engine_ratio_and_reports_each_lag():
    from mispo.config import AlgorithmConfig

    batch = RolloutBatch.from_samples([_sample(4, 3), _sample(2, 3)])
    batch.rewards = torch.tensor([1.0, 0.0])
    batch.values = torch.zeros(2, 3)
    batch.bootstrap_values = torch.zeros(2)
    batch.old_logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-0.2, -0.2, -0.2]])  # row 1: stale, the learner moved
    batch.version_logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])  # both at the engine's value
    decoupled = AlgorithmConfig(policy_loss="mispo_decoupled")
    prepare_update(batch, decoupled)
    assert batch.token_keep.all() and batch.traj_keep.all()  # e = 1 everywhere: the engine filter keeps all
    plain = AlgorithmConfig(policy_loss="mispo")
    prepare_update(batch, plain)
    assert batch.token_keep[0].all() and not batch.token_keep[1].any()  # x = e^0.8 > 2: the report drops row 1
    prepare_update(batch, decoupled)
    report = lag_diagnostics(batch, 4, decoupled)
    assert report["lag/0/tokens"] == 0.5 and report["lag/2/tokens"] == 0.5
    assert report["lag/2/accept"] == 1.0 and report["lag/2/drift"] == pytest.approx(0.8)
    assert report["lag/0/drift"] == 0.0 and report["lag/0/ess"] == pytest.approx(1.0)
    assert report["lag/2/abs_log_ratio"] == pytest.approx(0.8)


def test_the_registry_declares_what_the_loss_reads():
    spec = loss_spec("mispo_decoupled")
    assert spec.reads_version and spec.reads_masks and spec.reads_rollout and spec.options == ("lag_cap", "decoupled_clip")
    assert not loss_spec("mispo").reads_version and loss_spec("gspo").default_agg == "seq-mean-token-mean"
    with pytest.raises(ValueError, match="lag_cap"):
        PolicyLossConfig(lag_cap=0.0)
