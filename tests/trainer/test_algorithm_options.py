"""algorithm: every option has one owner and an effect: loss_options that the chosen loss ignores, or that
the recipe sets elsewhere, are errors naming the field."""

import pytest

from mispo.config import RecipeError, load_recipe


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.loss_options={traj_bounds: [0.9, 1.1]}"], "loss_options.traj_bounds is set by algorithm.traj_bounds"),
    (["algorithm.loss_options={traj_stat_includes_rejected: false}"],
     "is set by algorithm.traj_stat_includes_rejected"),
    (["algorithm.loss_options={tis_cap: 3.0}"], "tis_cap has no effect with policy_loss = 'mispo'"),
    (["algorithm.policy_loss=gspo", "algorithm.advantage=grpo", "algorithm.loss_options={dual_clip_c: 2.0}"],
     "dual_clip_c has no effect with policy_loss = 'gspo'"),
    (["algorithm.clip_eps=0.3"], "clip_eps has no effect with policy_loss = 'mispo'"),
    (["algorithm.policy_loss=nope"], "not a known loss"),
])
def test_options_without_effect_are_refused(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_options_the_loss_reads_are_accepted():
    r = load_recipe(None, ["algorithm.policy_loss=tis", "algorithm.loss_options={tis_cap: 3.0, kl_estimator: k3}",
                           "algorithm.clip_eps=0.3", "algorithm.traj_stat_includes_rejected=false"])
    assert r.algorithm.loss_options == {"tis_cap": 3.0, "kl_estimator": "k3"}
    assert r.algorithm.traj_stat_includes_rejected is False


def test_a_dumped_recipe_loads_again():
    """Workers and pipeline stages rebuild sections from dumps: every default must pass validation."""
    from mispo.config import AlgorithmConfig, TrainerConfig, dump_recipe

    assert AlgorithmConfig(**AlgorithmConfig().model_dump()) == AlgorithmConfig()
    assert TrainerConfig(**TrainerConfig().model_dump()) == TrainerConfig()
    r = load_recipe(None, ["algorithm.policy_loss=tis", "algorithm.advantage=grpo", "algorithm.clip_eps=0.3"])
    import yaml

    again = load_recipe(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                               for k, v in [("algorithm", r.algorithm.model_dump(mode="json"))]])
    assert again.algorithm == r.algorithm and dump_recipe(r)


@pytest.mark.parametrize("overrides, message", [
    # the engine's log-probs are of the nucleus (cut, renormalised); the learner scores the whole softmax
    (["rollout.top_p=0.9"], r"rollout.top_p = 0.9 with algorithm.policy_loss = 'mispo'.*nucleus"),
    (["rollout.top_p=0.95", "algorithm.policy_loss=tis"], r"rollout.top_p = 0.95 with algorithm.policy_loss = 'tis'"),
    (["rollout.top_p=0.95", "algorithm.policy_loss=icepop"], "policy_loss = 'icepop'"),
    (["rollout.top_p=0.95", "algorithm.policy_loss=ppo", "algorithm.critic_masks=true"], "algorithm.critic_masks"),
    (["rollout.top_p=0.95", "algorithm.policy_loss=ppo", "trainer.mismatch_attribution=true"],
     "trainer.mismatch_attribution"),
    # the adaptive band moves a mask that only MIS-PO (or the critic, with critic_masks) reads
    *[(["algorithm.adaptive_traj_band=true", f"algorithm.policy_loss={loss}", "algorithm.advantage=grpo"],
       f"adaptive_traj_band adapts MIS-PO's trajectory mask, which policy_loss = '{loss}' never reads")
      for loss in ("ppo", "gspo", "tis", "icepop", "cispo")],
    (["algorithm.critic_masks=true", "algorithm.advantage=grpo"], "critic_masks has no effect with advantage = 'grpo'"),
    (["algorithm.loss_agg=mean"], r"algorithm\.loss_agg .*'mean' is not an aggregation; fix: one of token-mean"),
    (["algorithm.loss_agg=token_mean"], "not an aggregation"),
])
def test_options_a_loss_would_not_honour_are_refused(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["rollout.top_p=0.9", "algorithm.policy_loss=ppo"],  # pi_rollout feeds only the mismatch/* metrics
    ["rollout.top_p=0.9", "algorithm.policy_loss=gspo", "algorithm.advantage=grpo"],
    ["rollout.top_p=0.9", "algorithm.policy_loss=cispo"],
    ["algorithm.adaptive_traj_band=true"],
    ["algorithm.adaptive_traj_band=true", "algorithm.policy_loss=ppo", "algorithm.critic_masks=true"],
    *[[f"algorithm.loss_agg={agg}"] for agg in ("token-mean", "seq-mean-token-mean", "token-sum-norm")],
])
def test_options_that_act_are_accepted(overrides):
    load_recipe(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.version_logprobs=rollout"], "version_logprobs = 'rollout' has no effect with algorithm.policy_loss = "
                                             "'mispo'"),
    (["algorithm.policy_loss=mispo_decoupled", "algorithm.version_logprobs=kept_versions"],
     "has no effect in trainer.mode = sync"),
    (["algorithm.policy_loss=mispo_decoupled", "algorithm.version_logprobs=kept_versions", "trainer.mode=async",
      "learner.zero_stage=3"], "fix: algorithm.version_logprobs: rollout"),
    (["algorithm.policy_loss=mispo", "algorithm.loss_options={lag_cap: 3.0}"], "lag_cap has no effect"),
])
def test_where_pi_v_comes_from_is_checked(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_where_pi_v_comes_from_resolves_per_layout():
    base = ["algorithm.policy_loss=mispo_decoupled", "algorithm.loss_options={lag_cap: 3.0}"]
    assert load_recipe(None, base).version_logprobs_source() is None  # sync: pi_v = pi_old
    assert load_recipe(None, base + ["trainer.mode=async"]).version_logprobs_source() == "kept_versions"
    assert load_recipe(None, base + ["trainer.mode=async", "learner.zero_stage=3"]).version_logprobs_source() == \
        "rollout"
    partial = load_recipe(None, base + ["trainer.mode=async", "rollout.partial_rollout_tokens=8"])
    assert partial.algorithm.policy_loss == "mispo_decoupled"  # it corrects each token: partial rollouts allowed


def test_a_loss_registered_by_a_user_is_a_known_loss_with_its_options():
    from mispo.algorithms import LOSSES, register_policy_loss

    @register_policy_loss("my_capped_loss", options=("tis_cap",))
    def my_loss(inputs, config):
        return inputs.logp.sum() * 0, {}

    try:
        r = load_recipe(None, ["algorithm.policy_loss=my_capped_loss", "algorithm.advantage=grpo",
                               "algorithm.loss_options={tis_cap: 3.0}"])
        assert r.algorithm.loss_options == {"tis_cap": 3.0}
        with pytest.raises(RecipeError, match="icepop_bounds has no effect"):
            load_recipe(None, ["algorithm.policy_loss=my_capped_loss", "algorithm.advantage=grpo",
                               "algorithm.loss_options={icepop_bounds: [0.5, 3]}"])
    finally:
        LOSSES.pop("my_capped_loss")


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.advantage=reverse_kl", "learner.critic=null"], "algorithm.teachers has none for run"),
    (["algorithm.advantage=reverse_kl", "learner.critic=null", "algorithm.teachers={run: t, math: m}"],
     "algorithm.teachers names math, which this run does not train on"),
    (["algorithm.advantage=grpo", "learner.critic=null", "algorithm.teachers={run: t}"],
     "algorithm.teachers has no effect with advantage = 'grpo'"),
])
def test_distillation_teachers_cover_exactly_the_runs_domains(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_distillation_needs_no_group_of_samples():
    r = load_recipe(None, ["algorithm.advantage=reverse_kl", "learner.critic=null", "algorithm.teachers={run: t}",
                           "rollout.n_samples=1"])
    assert r.algorithm.teachers == {"run": "t"}


def test_a_band_the_filters_cannot_use_is_refused_at_load():
    with pytest.raises(RecipeError, match="algorithm.traj_bounds must satisfy 0 <= lo <= hi"):
        load_recipe(None, ["algorithm.traj_bounds=[2, 1]"])
