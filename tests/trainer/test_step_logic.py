"""The driver's pure pieces, without Ray or engines: the staleness bound, per-step seeds, a step's
prompt draw, and the advantage / MIS-PO mask preparation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mispo.algorithms import mis_filter
from mispo.batch import RolloutBatch, Sample
from mispo.config import AlgorithmConfig, RecipeError, load_recipe
from mispo.loop.domains import Domain, draw_step, step_seed
from mispo.loop.prepare_update import prepare_update
from mispo.loop.staleness import drop_stale


def sample(version=0, reward=0.0, group=0, n=3, logprobs=None):
    return Sample(prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)),
                  rollout_logprobs=logprobs or [-1.0] * n, loss_mask=[1] * n, finish_reason="stop",
                  group=group, version=version, reward=reward)


def test_drop_stale_keeps_exactly_the_samples_within_the_bound():
    rollouts = [("a", [sample(version=v) for v in (5, 4, 3, 2)]), ("b", [sample(version=4)])]
    kept, metrics = drop_stale(rollouts, learner_version=5, max_staleness=2)
    assert [[s.version for s in samples] for _, samples in kept] == [[5, 4, 3], [4]]
    assert metrics["rollout/dropped_stale"] == 1.0
    assert metrics["rollout/staleness_max"] == 2.0
    assert metrics["rollout/staleness"] == pytest.approx((0 + 1 + 2 + 1) / 4)


def test_drop_stale_at_bound_zero_keeps_only_on_policy_samples():
    kept, metrics = drop_stale([("a", [sample(version=3), sample(version=2)])], 3, 0)
    assert [s.version for s in kept[0][1]] == [3]
    assert metrics["rollout/staleness_max"] == 0.0 and metrics["rollout/dropped_stale"] == 1.0


@given(st.integers(0, 2**14 - 1), st.integers(0, 10**6), st.integers(0, 10**6))
def test_step_seeds_are_distinct_per_step_and_stay_in_range(seed, a, b):
    if a != b:
        assert step_seed(seed, a) != step_seed(seed, b)
    # requests add (group * n + sample) * max_turns + turn < 2**24 without reaching the next step's seed
    assert step_seed(seed, a) + 2**24 - 1 < step_seed(seed, a + 1) <= 2**63 - 1


class _Sampler:
    def __init__(self):
        self.at = 0

    def next_batch(self, count):
        out = list(range(self.at, self.at + count))
        self.at += count
        return out


class _Tok:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 for c in text]}

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]


def test_draw_step_splits_by_weight_and_numbers_groups_across_domains(tmp_path):
    from mispo.config import Recipe

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(20)]
    a = Domain("a", Recipe(), weight=3.0, train_rows=rows)
    b = Domain("b", Recipe(), weight=1.0, train_rows=rows)
    samplers = {"a": _Sampler(), "b": _Sampler()}
    jobs = draw_step([a, b], samplers, 8, _Tok())
    assert [d.name for d, _ in jobs] == ["a", "b"]
    assert [len(reqs) for _, reqs in jobs] == [6, 2]
    assert [r["group"] for _, reqs in jobs for r in reqs] == list(range(8))
    assert [r["row"]["prompt"] for r in jobs[1][1]] == ["q0", "q1"]
    again = draw_step([a, b], samplers, 8, _Tok())  # samplers advance
    assert [r["row"]["prompt"] for r in again[0][1]][:2] == ["q6", "q7"]


def _batch(rewards, groups, old_shift=0.0):
    samples = [sample(reward=r, group=g, n=4) for r, g in zip(rewards, groups)]
    batch = RolloutBatch.from_samples(samples)
    batch.old_logprobs = batch.rollout_logprobs + old_shift * batch.response_mask
    return batch


def test_prepare_update_group_advantages_and_masks():
    batch = _batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], old_shift=0.0)
    a = AlgorithmConfig(policy_loss="mispo", advantage="grpo")
    metrics = prepare_update(batch, a)
    assert metrics == {}
    # group 0: rewards 1, 0 -> +/- 1/sqrt(2) after std normalisation; group 1 has no variance -> 0
    adv = batch.advantages[:, 0]
    assert adv[0] == pytest.approx(0.5 / math.sqrt(0.5), rel=1e-4) and adv[1] == pytest.approx(-adv[0])
    assert adv[2] == 0 and adv[3] == 0
    assert torch.equal(batch.advantages, batch.advantages[:, :1] * batch.response_mask)
    assert batch.token_keep.all() and batch.traj_keep.all()  # pi_old == pi_rollout


def test_prepare_update_masks_are_the_filters_with_the_recipe_bounds():
    batch = _batch([1.0, 0.0], [0, 0], old_shift=0.01)  # ratio e^0.01 per token: outside [0.996, 1.001]
    a = AlgorithmConfig(policy_loss="mispo", advantage="grpo", traj_bounds=[0.99, 1.02])
    prepare_update(batch, a)
    token, traj = mis_filter(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask,
                             tuple(a.token_bounds), (0.99, 1.02))
    assert torch.equal(batch.token_keep, token) and torch.equal(batch.traj_keep, traj)
    assert batch.traj_keep.all()
    prepare_update(batch, AlgorithmConfig(policy_loss="mispo", advantage="grpo"))  # default band rejects
    assert not batch.traj_keep.any()


def test_prepare_update_gae_sets_returns():
    batch = _batch([1.0, 0.0], [0, 1])
    batch.values = torch.full_like(batch.rollout_logprobs, 0.25) * batch.response_mask
    batch.bootstrap_values = torch.zeros(2)
    prepare_update(batch, AlgorithmConfig(policy_loss="mispo", advantage="gae", gamma=1.0, lam=1.0))
    # gamma = lambda = 1: A_t = R - V(s_t), returns = R
    assert torch.allclose(batch.returns[0], torch.ones(4)) and torch.allclose(batch.returns[1], torch.zeros(4))
    assert torch.allclose(batch.advantages[0], torch.full((4,), 0.75))


def test_async_needs_a_staleness_bound_and_sync_refuses_one():
    with pytest.raises(RecipeError, match="max_staleness"):
        load_recipe("recipes/math_expert.yaml", ["trainer.mode=async", "trainer.max_staleness=0"])
    with pytest.raises(RecipeError, match="no effect in trainer.mode = sync"):
        load_recipe("recipes/math_expert.yaml", ["trainer.max_staleness=2"])
    assert load_recipe("recipes/math_expert.yaml", ["trainer.mode=async", "trainer.max_staleness=2"]).trainer.max_staleness == 2


def test_traj_statistic_over_kept_tokens_has_one_owner():
    # one token far outside the token band: counted, it pulls the trajectory ratio out of its band
    batch = _batch([1.0, 0.0], [0, 0])
    batch.old_logprobs[0, 0] += 2.0
    prepare_update(batch, AlgorithmConfig(policy_loss="mispo", advantage="grpo"))
    assert batch.traj_keep.tolist() == [False, True] and not batch.token_keep[0, 0]
    prepare_update(batch, AlgorithmConfig(policy_loss="mispo", advantage="grpo", traj_stat_includes_rejected=False))
    assert batch.traj_keep.tolist() == [True, True]


def _group(g, rewards, version=0):
    return [sample(group=g, reward=r, version=version) for r in rewards]


def test_dynamic_sampling_never_keeps_a_zero_variance_group_and_refills_to_the_target():
    from mispo.loop.dynamic_sampling import fill_batch

    first = [("d", _group(0, [1, 0]) + _group(1, [1, 1]) + _group(2, [0, 0]) + _group(3, [0, 1]))]
    draws = []

    def draw_more(count, first_group):
        draws.append((count, first_group))
        return [("d", _group(first_group, [0, 0]) + _group(first_group + 1, [1, 0]) + _group(first_group + 2, [0, 1]))]

    kept, metrics = fill_batch(first, 3, 5, draw_more)
    groups = [s.group for _, samples in kept for s in samples]
    assert sorted(set(groups)) == [0, 3, 5]  # 1, 2 and 4 had one reward; 6 is beyond the target
    for g in set(groups):
        assert len({s.reward for _, samples in kept for s in samples if s.group == g}) == 2
    assert draws == [(1, 4)]
    assert metrics == {"dynamic_sampling/dropped_groups": 3.0, "dynamic_sampling/refills": 1.0,
                       "dynamic_sampling/groups": 3.0, "dynamic_sampling/cap_reached": 0.0}


def test_dynamic_sampling_stops_refilling_at_its_cap():
    from mispo.loop.dynamic_sampling import fill_batch

    calls = []

    def draw_more(count, first_group):
        calls.append(first_group)
        return [("d", _group(first_group, [1, 1]))]  # never informative

    kept, metrics = fill_batch([("d", _group(0, [1, 1]) + _group(1, [0, 1]))], 4, 2, draw_more)
    assert calls == [2, 3]  # group ids continue after every draw, two refills and no more
    assert [s.group for _, samples in kept for s in samples] == [1, 1]
    assert metrics["dynamic_sampling/cap_reached"] == 1.0 and metrics["dynamic_sampling/refills"] == 2.0


def test_steps_without_any_reward_variance_are_redrawn_then_stop_the_run():
    from mispo.loop.dynamic_sampling import no_variance_streak

    assert "1 of 3 such steps" in no_variance_streak(1, max_refills=2)
    assert "2 of 3 such steps" in no_variance_streak(2, max_refills=2)
    with pytest.raises(RuntimeError, match=r"algorithm.dynamic_sampling: 3 steps in a row \(9 draws"):
        no_variance_streak(3, max_refills=2)


@pytest.mark.parametrize("length, expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (20, -1.0)])
def test_overlong_penalty_ramps_over_the_buffer(length, expected):
    from mispo.loop.domains import overlong_penalty

    assert overlong_penalty(length, 16, 4) == pytest.approx(expected)
    assert overlong_penalty(length, 16, 4, penalty=0.5) == pytest.approx(expected / 2)


def test_overlong_and_dynamic_sampling_options_are_checked():
    with pytest.raises(RecipeError, match="reward.overlong.buffer = 16 must be below"):
        load_recipe("recipes/math_expert.yaml", ["reward.overlong={buffer: 16}"])
    with pytest.raises(RecipeError, match="reward.overlong.buffer"):
        load_recipe("recipes/math_expert.yaml", ["reward.overlong={}"])
    r = load_recipe("recipes/math_expert.yaml", ["reward.overlong={buffer: 4}", "algorithm.dynamic_sampling={}"])
    assert r.reward.overlong.penalty == 1.0 and r.algorithm.dynamic_sampling.max_refills == 3


def test_core_split_by_mode_and_explicit():
    from mispo.infra.cpu_split import CoreSplit, split_cores

    assert split_cores(0, "sync", [0, 1], 1) == CoreSplit(None, None)  # never run at once: share
    assert split_cores(0, "async", [0, 1], 1) == CoreSplit([[0]], [1])
    assert split_cores(0, "async", [0, 1, 2, 3, 4], 2) == CoreSplit([[0, 1], [2]], [3, 4])  # every core used
    assert split_cores(0, "async", list(range(8)), 2) == CoreSplit([[0, 1], [2, 3]], [4, 5, 6, 7])
    assert split_cores(0, "async", [3], 1) == CoreSplit(None, None)
    assert split_cores(3, "sync", list(range(8)), 1) == CoreSplit([[0, 1, 2]], [3, 4, 5, 6, 7])


def test_core_split_that_cannot_fit_names_the_field():
    from mispo.infra.cpu_split import split_cores

    with pytest.raises(RecipeError, match=r"resources.rollout_cores = 2 leaves no core for the learners: this "
                                          r"machine gives the run 2 \(0,1\)"):
        split_cores(2, "async", [0, 1], 1)
    with pytest.raises(RecipeError, match="fewer than rollout.num_workers = 3"):
        split_cores(2, "async", list(range(8)), 3)


@pytest.mark.parametrize("penalty", [None, 0.5])
def test_overlong_penalty_survives_the_truncation_bootstrap(penalty):
    """GAE with bootstrap_truncated replaces a truncated answer's reward by V(s_T); the overlong penalty is
    a reward for the length it reached, so it stays: return = V(s_T) + penalty (the answer's own score,
    of an unfinished answer, is what the bootstrap drops)."""
    from types import SimpleNamespace

    overlong = [] if penalty is None else [f"reward.overlong={{buffer: 2, penalty: {penalty}}}"]
    recipe = load_recipe(None, ["rollout.max_new_tokens=4", *overlong])
    runner = SimpleNamespace(score=lambda rows: SimpleNamespace(scores=[1.0] * len(rows), extras=[{}] * len(rows),
                                                                metrics={}))
    truncated, stopped = sample(n=4), sample(n=3)
    truncated.finish_reason = "length"
    Domain("d", recipe, reward=runner).score([truncated, stopped])
    batch = RolloutBatch.from_samples([truncated, stopped])
    batch.values = torch.full_like(batch.rollout_logprobs, 0.25) * batch.response_mask
    batch.bootstrap_values = torch.tensor([0.5, 0.0])
    prepare_update(batch, AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0))
    p = -(penalty or 0.0)  # 4 tokens = the limit: the whole penalty
    assert torch.allclose(batch.returns[0], torch.full((4,), 0.5 + p))  # V(s_T), then the penalty
    assert batch.advantages[0, 0] == pytest.approx(0.5 + p - 0.25)
    # 3 tokens, half-way into the 2-token buffer: 1.0 - penalty / 2, as without the bootstrap
    assert torch.allclose(batch.returns[1, :3], torch.full((3,), 1.0 + p / 2))
    prepare_update(batch, AlgorithmConfig(advantage="gae", bootstrap_truncated=False))
    assert torch.allclose(batch.returns[0], torch.full((4,), 1.0 + p))  # scored as it ends, penalty included


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_adaptive_target_keep_sets_the_share_of_kept_trajectories(target):
    from mispo.loop.prepare_update import adaptive_band

    g = torch.Generator().manual_seed(0)
    batch = _batch([1.0, 0.0] * 20, list(range(40)))
    batch.old_logprobs = batch.rollout_logprobs + 0.003 + 0.002 * torch.randn(batch.rollout_logprobs.shape, generator=g)
    algo = AlgorithmConfig(policy_loss="mispo", advantage="grpo", adaptive_traj_band=True, adaptive_target_keep=target)
    band = adaptive_band(algo)
    prepare_update(batch, algo, band)
    kept = float(batch.traj_keep.float().mean())
    assert target <= kept < target + 0.1
    assert adaptive_band(AlgorithmConfig()) is None
    prepare_update(batch, AlgorithmConfig(policy_loss="mispo", advantage="grpo"))
    assert float(batch.traj_keep.float().mean()) < 0.2  # the base band (0.996, 1.001) alone


def test_whiten_advantages_whitens_over_response_tokens():
    batch = _batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    batch.response_mask[0, 2:] = 0
    raw = _batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    raw.response_mask = batch.response_mask.clone()
    prepare_update(raw, AlgorithmConfig(advantage="grpo"))
    prepare_update(batch, AlgorithmConfig(advantage="grpo", whiten_advantages=True))
    m = batch.response_mask.bool()
    assert not torch.allclose(batch.advantages[m], raw.advantages[m])
    assert float(batch.advantages[m].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(batch.advantages[m].std()) == pytest.approx(1.0, rel=1e-3)


def test_reward_settings_reach_the_reward_runner():
    recipe = load_recipe(None, ["reward.max_concurrency=3", "reward.timeout=7", "reward.failure_score=-1"])
    domain = Domain("d", recipe).load(with_train=False)
    try:
        runner = domain.reward
        assert (runner.max_concurrency, runner.failure_score) == (3, -1.0)
        assert 7.0 in vars(runner).values()  # the timeout, whatever the runner calls it
    finally:
        domain.close()


def test_optimizer_settings_reach_the_engine(monkeypatch):
    """learner.actor / critic: lr, betas, weight_decay, grad_clip and warmup_steps are what DeepSpeed gets."""
    import deepspeed

    from mispo.config import OptimConfig
    from mispo.learner.engine import build_engine

    seen = {}

    def initialize(model, optimizer, lr_scheduler, config):
        seen.update(optimizer=optimizer, scheduler=lr_scheduler, config=config)
        return "engine", optimizer, None, lr_scheduler

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    optim = OptimConfig(lr=0.01, betas=(0.8, 0.9), weight_decay=0.05, grad_clip=0.5, warmup_steps=3)
    assert build_engine(torch.nn.Linear(2, 2), optim, zero_stage=1, dtype="float32", world_size=2) == "engine"
    groups = seen["optimizer"].param_groups
    assert all(g["betas"] == (0.8, 0.9) for g in groups)
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}  # no decay on biases / norms
    assert seen["config"]["gradient_clipping"] == 0.5 and seen["config"]["zero_optimization"]["stage"] == 1
    assert groups[0]["lr"] == pytest.approx(0.01 / 4)  # warm-up step 0 of 3
    for stage, ranks, runs in ((1, 1, 0), (2, 1, 0), (3, 1, 3), (0, 2, 0), (2, 4, 2)):
        build_engine(torch.nn.Linear(2, 2), optim, zero_stage=stage, dtype="float32", world_size=ranks)
        assert seen["config"]["zero_optimization"]["stage"] == runs  # ZeRO-1/2 on one rank partition nothing


@pytest.mark.parametrize("cores, sharers", [(None, 1), (None, 2), ([0], 1), (None, 64)])
def test_a_learner_uses_its_cores_even_where_ray_gave_it_one_thread(cores, sharers):
    """Ray starts num_cpus=0 actors with OMP_NUM_THREADS=1; pin_process gives torch the run's cores, divided
    among the processes that compute on them at once."""
    import subprocess
    import sys

    from mispo.infra.cpu_split import available_cores

    code = ("import torch; from mispo.infra.cpu_split import pin_process; "
            f"pin_process({cores!r}, sharers={sharers}); print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == max(1, len(cores or available_cores()) // sharers)
