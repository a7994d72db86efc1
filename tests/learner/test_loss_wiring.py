"""How the policy learner wires its loss, without DeepSpeed: the entropy bonus reaches the gradient, and
logged losses of a mini-batch split into micro-batches equal the loss of the whole mini-batch."""

import pytest
import torch

from mispo.algorithms import PolicyLossInputs, compute_policy_loss
from mispo.batch import RolloutBatch, Sample
from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig
from mispo.learner.metrics import combine_partials, mean_metrics
from mispo.learner.policy_worker import PolicyWorker
from mispo.learner.packing import pack_samples


def _samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(7, 90, (4,), generator=g).tolist()
        r = torch.randint(7, 90, (5,), generator=g).tolist()
        out.append(Sample(prompt_ids=p, response_ids=r, rollout_logprobs=[0.0] * 5, loss_mask=[1] * 5,
                          finish_reason="stop", group=i // 2, reward=float(i % 2)))
    return out


def _bare_worker(model, entropy_coef: float) -> PolicyWorker:
    """A PolicyWorker whose 'engine' is the plain module (what _micro_loss needs of it: a forward)."""
    w = PolicyWorker.__new__(PolicyWorker)
    w.engine, w.device, w.temperature = model, torch.device("cpu"), 1.0
    w.algo = AlgorithmConfig(entropy_coef=entropy_coef)
    w.loss_config = w.algo.loss_config(5)
    w.learner_cfg, w.model_cfg = LearnerConfig(micro_batch_tokens=1000), ModelConfig()
    return w


def _grad_of_loss(model, entropy_coef: float) -> torch.Tensor:
    samples = _samples()
    batch = RolloutBatch.from_samples(samples)
    shape = batch.response_mask.shape
    batch.old_logprobs = torch.zeros(shape)
    batch.rollout_logprobs = torch.zeros(shape)
    batch.advantages = torch.zeros(shape)  # no policy-gradient signal: only the entropy term can move weights
    batch.token_keep, batch.traj_keep = torch.ones(shape, dtype=torch.bool), torch.ones(shape[0], dtype=torch.bool)
    mb = pack_samples(samples, list(range(len(samples))), max_tokens=1000)[0]
    model.zero_grad()
    loss, _ = _bare_worker(model, entropy_coef)._micro_loss(batch, mb, float(batch.response_mask.sum()))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None] or [torch.zeros(1)])


def test_entropy_bonus_reaches_the_gradient(tiny_checkpoint):
    from mispo.learner.models import load_policy

    model = load_policy(str(tiny_checkpoint), "float32")
    assert _grad_of_loss(model, 0.0).abs().max() == 0  # zero advantages, no bonus: nothing to learn
    assert _grad_of_loss(model, 0.1).abs().max() > 1e-6


@pytest.mark.parametrize("loss_name", ["mispo", "ppo", "gspo"])
@pytest.mark.parametrize("cuts", [[2], [1, 3], [1, 2, 3]])
def test_logged_loss_of_micro_batches_equals_whole_mini_batch(loss_name, cuts):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    logp_old = -torch.rand(B, T, generator=g)
    inputs = dict(logp=logp_old + 0.01 * torch.randn(B, T, generator=g), logp_old=logp_old,
                  advantages=torch.randn(B, T, generator=g), mask=mask, logp_rollout=logp_old.clone())
    config = AlgorithmConfig(policy_loss=loss_name).loss_config(T)
    n_tok, n_seq = float(mask.sum()), float(B)

    def metrics(rows):
        sub = {k: v[rows] for k, v in inputs.items()}
        _, m = compute_policy_loss(loss_name, PolicyLossInputs(**sub, num_tokens=n_tok, num_seqs=n_seq), config)
        return {k: float(v) for k, v in m.items()}

    whole = metrics(list(range(B)))
    bounds = [0, *cuts, B]
    pieces = [metrics(list(range(a, b))) for a, b in zip(bounds, bounds[1:])]
    combined = combine_partials(pieces)
    for key in ("actor/pg_loss", "actor/loss"):
        assert combined[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7)
    assert mean_metrics(pieces)["actor/loss"] != pytest.approx(whole["actor/loss"], rel=1e-3)  # the old bug


def test_empty_prompt_is_refused_by_packing():
    samples = _samples(2)
    samples[1].prompt_ids = []
    with pytest.raises(ValueError, match="sample 1 has an empty prompt"):
        pack_samples(samples, [0, 1], max_tokens=1000)


def test_gspo_averages_per_sequence_by_default():
    """Published GSPO weights every sequence alike; token-mean would weight them by length."""
    assert AlgorithmConfig(policy_loss="gspo").loss_config(8).loss_agg == "seq-mean-token-mean"
    assert AlgorithmConfig(policy_loss="mispo").loss_config(8).loss_agg == "token-mean"
    assert AlgorithmConfig(policy_loss="gspo", loss_agg="token-mean").loss_config(8).loss_agg == "token-mean"


@pytest.mark.parametrize("loss_name", ["mispo", "ppo"])
def test_fused_pi_old_equals_a_separate_forward(tiny_checkpoint, loss_name):
    """Without batch.old_logprobs the update's own forward is pi_old and the loss computes the MIS-PO
    masks: the same loss, masks and gradient as a separate pi_old forward plus prepare_update's masks."""
    from mispo.learner.models import load_policy
    from mispo.learner.packing import response_logprobs
    from mispo.loop.prepare_update import prepare_update

    model = load_policy(str(tiny_checkpoint), "float32")
    samples = _samples()
    mb = pack_samples(samples, list(range(len(samples))), max_tokens=1000)[0]
    old = response_logprobs(model, samples, 1000)
    g = torch.Generator().manual_seed(1)
    for i, s in enumerate(samples):  # an engine that disagrees: some tokens and sequences get filtered
        s.rollout_logprobs = (old[i, :5] + 0.6 * torch.randn(5, generator=g)).tolist()
    algo = AlgorithmConfig(policy_loss=loss_name, advantage="grpo", token_bounds=[0.6, 1.6], traj_bounds=[0.8, 1.25])

    def loss_and_grad(precomputed: bool):
        batch = RolloutBatch.from_samples(samples)
        batch.old_logprobs = old.clone() if precomputed else None
        prepare_update(batch, algo)
        assert (batch.token_keep is None) == (not precomputed)
        w = _bare_worker(model, 0.0)
        w.algo, w.loss_config = algo, algo.loss_config(5)
        model.zero_grad()
        loss, metrics = w._micro_loss(batch, mb, float(batch.response_mask.sum()))
        loss.backward()
        return loss.item(), metrics, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss_a, metrics_a, grad_a = loss_and_grad(True)
    loss_b, metrics_b, grad_b = loss_and_grad(False)
    if loss_name == "mispo":
        assert 0 < metrics_a["mispo/keep_frac"] < 1  # the filters act in this batch
        assert metrics_b["mispo/keep_frac"] == pytest.approx(metrics_a["mispo/keep_frac"])
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    assert grad_a.abs().max() > 0
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-7)


def _loss_metrics(loss_name, inputs, rows, n_tok, n_seq, precomputed_masks):
    from mispo.algorithms.filters import mis_filter_detailed

    algo = AlgorithmConfig(policy_loss=loss_name, advantage="grpo", token_bounds=(0.8, 1.25), traj_bounds=(0.9, 1.1))
    config = algo.loss_config(8)
    sub = {k: v[rows] for k, v in inputs.items()}
    if precomputed_masks:  # what prepare_update hands the learner when pi_old comes from its own forward
        res = mis_filter_detailed(sub["logp_old"], sub["logp_rollout"], sub["mask"], (0.8, 1.25), (0.9, 1.1))
        sub.update(token_keep=res.token_keep, traj_keep=res.traj_keep)
    _, m = compute_policy_loss(loss_name, PolicyLossInputs(**sub, num_tokens=n_tok, num_seqs=n_seq), config)
    return {k: float(v) for k, v in m.items()}


def _uneven_inputs(B=9, T=8):
    """Rows of 1..T tokens and an engine that disagrees on some tokens, so every statistic varies by row."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logp_old = -torch.rand(B, T, generator=g) - 0.1
    return dict(logp=logp_old + 0.05 * torch.randn(B, T, generator=g), logp_old=logp_old,
                advantages=torch.randn(B, generator=g)[:, None] + 0.3 * torch.randn(B, T, generator=g), mask=mask,
                logp_rollout=logp_old + 0.3 * torch.randn(B, T, generator=g), entropy=torch.rand(B, T, generator=g))


@pytest.mark.parametrize("loss_name, precomputed", [("mispo", True), ("mispo", False), ("ppo", False),
                                                    ("gspo", False), ("tis", False), ("icepop", False),
                                                    ("cispo", False)])
def test_logged_means_of_uneven_pieces_equal_the_whole_batch(loss_name, precomputed):
    """Micro-batches of 8 rows and of 1 row, then ranks / mini-batches: each logged mean (keep fractions,
    |log x|, entropy, advantages' mean and std, the losses' own fractions) is the whole batch's."""
    inputs = _uneven_inputs()
    B = inputs["mask"].shape[0]
    n_tok, n_seq = float(inputs["mask"].sum()), float(B)
    whole = _loss_metrics(loss_name, inputs, list(range(B)), n_tok, n_seq, precomputed)
    micro = [_loss_metrics(loss_name, inputs, rows, n_tok, n_seq, precomputed) for rows in ([*range(8)], [8])]
    rank_a = combine_partials(micro[:1])  # ranks: rank 0 held the 8-row piece, rank 1 the 1-row piece
    over_ranks = combine_partials([rank_a, combine_partials(micro[1:])])
    over_minis = mean_metrics([combine_partials([m]) for m in micro])  # or two mini-batches of one rank
    means = [k for k in whole if k not in ("actor/pg_loss", "actor/loss")]
    assert {"adv/mean", "adv/std", "actor/entropy", "mismatch/log_ratio_abs_mean", "actor/num_tokens"} <= set(means)
    for combined in (combine_partials(micro), over_ranks, over_minis):
        for k in means:
            assert combined[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k
    if loss_name == "mispo":  # the keep fractions differ between the pieces: a plain mean would be wrong
        key = "mispo/token_keep_frac"
        plain = sum(m[key] for m in micro) / 2
        assert plain != pytest.approx(whole[key], abs=1e-3)


def test_the_rollout_gap_has_one_name():
    inputs = _uneven_inputs()
    for precomputed in (True, False):
        m = _loss_metrics("mispo", inputs, list(range(9)), float(inputs["mask"].sum()), 9.0, precomputed)
        assert "mismatch/log_ratio_abs_mean" in m and not any(k.startswith("mispo/log_ratio") for k in m)


def test_logged_critic_means_of_uneven_pieces_equal_the_whole_batch():
    from mispo.algorithms.critic import value_loss

    inputs = _uneven_inputs()
    mask, values, returns = inputs["mask"], inputs["logp"], inputs["advantages"]
    n_tok = float(mask.sum())

    def metrics(rows):
        _, m = value_loss(values[rows], returns[rows], mask[rows], old_values=values[rows] + 0.1, clip_range=0.05,
                          num_tokens=n_tok)
        return {k: float(v) for k, v in m.items()}

    whole, combined = metrics(list(range(9))), combine_partials([metrics(list(range(8))), metrics([8])])
    for k in ("critic/vf_loss", "critic/value_mean", "critic/return_mean", "critic/vf_clip_frac", "critic/num_tokens"):
        assert combined[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("value_clip, critic_masks", [(None, False), (0.05, False), (None, True)])
def test_critic_update_reads_value_clip_and_critic_masks(value_clip, critic_masks):
    """CriticWorker.train without DeepSpeed: algorithm.value_clip clips around the old values (clip fraction
    and loss change), critic_masks drops the rejected tokens' terms."""
    from mispo.learner.critic_worker import CriticWorker

    samples = _samples()
    batch = RolloutBatch.from_samples(samples)
    shape = batch.response_mask.shape
    batch.values, batch.returns = torch.zeros(shape), torch.ones(shape)
    batch.token_keep = torch.ones(shape, dtype=torch.bool)
    batch.token_keep[:, 2:] = False
    batch.traj_keep = torch.ones(shape[0], dtype=torch.bool)
    losses = []

    class Engine:
        def train(self):
            pass

        def step(self):
            pass

        def get_lr(self):
            return [0.0]

    w = CriticWorker.__new__(CriticWorker)
    w.engine, w.device, w.rank, w.world_size = Engine(), torch.device("cpu"), 0, 1
    w.algo = AlgorithmConfig(value_clip=value_clip, critic_masks=critic_masks)
    w.learner_cfg, w.generator = LearnerConfig(micro_batch_tokens=1000, critic_mini_batches=1), torch.Generator()
    w._values = lambda mb: torch.full((1, int(mb.input_ids.numel())), 0.5)  # V = 0.5 everywhere, old V = 0
    w.backward = lambda loss, mb, last: losses.append(float(loss))
    metrics = w.train(batch)
    # unclipped: 1/2 (0.5 - 1)^2 = 0.125 per token; clipped to old V + 0.05: 1/2 (0.05 - 1)^2 = 0.45125
    per_token = 0.45125 if value_clip else 0.125
    kept = 2 / 5 if critic_masks else 1.0
    assert metrics["critic/vf_loss"] == pytest.approx(per_token * kept, rel=1e-5)
    assert metrics["critic/vf_clip_frac"] == (1.0 if value_clip else 0.0)
