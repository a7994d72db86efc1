"""Multi-domain recipes: loading, the per-step split of prompts, and the errors of bad domain specs."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mispo.config import RecipeError, load_recipe
from mispo.loop.domains import load_domains, split_prompts

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@given(st.integers(0, 500), st.lists(st.floats(0.01, 100), min_size=1, max_size=6))
def test_split_prompts_sums_and_follows_the_weights(total, weights):
    counts = split_prompts(total, weights)
    assert sum(counts) == total and len(counts) == len(weights)
    if total >= len(weights):
        assert min(counts) >= 1
    shares = [total * w / sum(weights) for w in weights]
    if min(shares) >= 1:  # no domain needs the at-least-one rule: plain largest remainder
        assert all(abs(c - s) < 1 + 1e-9 for c, s in zip(counts, shares))


def test_split_prompts_examples():
    assert split_prompts(16, [1, 1]) == [8, 8]
    assert split_prompts(10, [3, 1]) == [8, 2]  # 7.5 / 2.5: the larger remainder wins the tie in order
    assert split_prompts(3, [100, 1, 1]) == [1, 1, 1]


def test_generalist_recipe_has_reward_domains_and_an_environment_domain():
    recipe = load_recipe(RECIPES / "generalist.yaml")
    math, tool, code = load_domains(recipe)
    try:
        assert (math.name, tool.name, code.name) == ("math", "tool", "code")
        assert math.environment is None and math.reward is not None and math.train_rows and math.eval_rows
        assert tool.environment and tool.reward is None
        assert tool.max_new_tokens == load_recipe(RECIPES / "tool_expert.yaml").rollout.max_new_tokens
        assert not set(r["prompt"] for r in math.eval_rows) & set(r["prompt"] for r in math.train_rows)
        # code: the bundled short functions, scored in the sandbox, with its own recipe's length limit
        assert code.environment is None and code.reward is not None and code.eval_rows
        assert code.recipe.data.train == "builtin:functions" and "test" in code.eval_rows[0]
        assert code.max_new_tokens == load_recipe(RECIPES / "code_expert.yaml").rollout.max_new_tokens
        assert not set(r["task_id"] for r in code.eval_rows) & set(r["task_id"] for r in code.train_rows)
    finally:
        math.close()
        code.close()


def test_single_domain_recipe_is_one_domain_named_after_it():
    (domain,) = load_domains(load_recipe(RECIPES / "math_expert.yaml"))
    try:
        assert domain.name == "math_expert" and domain.weight == 1.0
    finally:
        domain.close()


def test_domains_and_own_data_conflict(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(f"domains:\n  math: {{recipe: {RECIPES / 'math_expert.yaml'}}}\ndata:\n  train: builtin:arithmetic\n")
    with pytest.raises(RecipeError, match="domains.*data would be ignored.*fix"):
        load_recipe(f)


def test_pipeline_needs_domains(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("pipeline: {rounds: 1}\n")
    with pytest.raises(RecipeError, match="pipeline: needs domains"):
        load_recipe(f)


def test_missing_domain_recipe_names_the_domain(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("domains:\n  chess: {recipe: chess.yaml}\n")
    with pytest.raises(RecipeError, match=r"domains\.chess\.recipe = 'chess\.yaml'.*no such file"):
        load_domains(load_recipe(f))


def test_bad_key_in_a_domain_recipe_names_the_domain_and_its_file(tmp_path):
    (tmp_path / "d.yaml").write_text("rollout:\n  max_new_tokes: 3\n")
    f = tmp_path / "r.yaml"
    f.write_text("domains:\n  d: {recipe: d.yaml}\n")
    with pytest.raises(RecipeError, match=r"(?s)domain 'd' \(.*d\.yaml\).*rollout\.max_new_tokes"):
        load_domains(load_recipe(f))


# --------------------------------------------------------------------------- whose setting counts
class _Segments:
    """RolloutGroup.generate stand-in: every call returns its whole budget ("length"); records budgets."""

    def __init__(self):
        self.budgets = []

    def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
        from mispo.batch import Sample

        self.budgets.append(max_new_tokens)
        return [Sample(prompt_ids=r["prompt_ids"], response_ids=[5] * max_new_tokens,
                       rollout_logprobs=[-1.0] * max_new_tokens, loss_mask=[1] * max_new_tokens,
                       finish_reason="length", group=r["group"]) for r in requests for _ in range(n)]


def _parent(tmp_path, domain_yaml: str, parent_yaml: str = "", overrides: str = ""):
    (tmp_path / "d.yaml").write_text(domain_yaml)
    f = tmp_path / "r.yaml"
    f.write_text(f"domains:\n  d: {{recipe: d.yaml{overrides}}}\n{parent_yaml}")
    return load_recipe(f)


ASYNC = "trainer: {mode: async, max_staleness: 1}\n"


def test_the_parents_partial_rollouts_act_on_its_domains(tmp_path):
    recipe = _parent(tmp_path, "rollout: {max_new_tokens: 10}\n", ASYNC + "rollout: {partial_rollout_tokens: 4}\n")
    (domain,) = load_domains(recipe)
    try:
        engine = _Segments()
        [s] = domain.sample(engine, [{"prompt_ids": [1, 2], "group": 0}], n=1, temperature=1.0)
        assert engine.budgets == [4, 4, 2] and len(s.response_ids) == 10  # the parent's k, the domain's length
        assert domain.sampling.max_model_len == recipe.rollout.max_model_len  # the engines' context
    finally:
        domain.close()


@pytest.mark.parametrize("domain_yaml, parent_yaml, message", [
    # a domain's own sampling settings would be silently replaced by the parent's
    ("rollout: {temperature: 0.7}\n", "", r"domain 'd' \(.*d\.yaml\) sets rollout\.temperature = 0\.7, but a "
     r"multi-domain run draws every domain's samples at the parent's rollout\.temperature = 1\.0.*fix:"),
    ("rollout: {top_p: 0.9}\nalgorithm: {policy_loss: ppo}\n", "algorithm: {policy_loss: ppo}\n",
     r"sets rollout\.top_p = 0\.9"),
    (ASYNC + "rollout: {partial_rollout_tokens: 4}\n", ASYNC, r"sets rollout\.partial_rollout_tokens = 4"),
    # the parent's partial rollouts cannot act on a multi-turn domain, or on domains shorter than a segment
    ("rollout: {environment: 'environments.tool_env:CalculatorEnv'}\nreward: {plugins: []}\n",
     ASYNC + "rollout: {partial_rollout_tokens: 4}\n", r"covers single-turn rollouts, and domain 'd'"),
    ("rollout: {max_new_tokens: 4}\n", ASYNC + "rollout: {partial_rollout_tokens: 4}\n",
     "not below any domain's rollout.max_new_tokens"),
])
def test_a_domain_setting_the_run_would_not_honour_is_an_error(tmp_path, domain_yaml, parent_yaml, message):
    with pytest.raises(RecipeError, match=message):
        load_domains(_parent(tmp_path, domain_yaml, parent_yaml))


@pytest.mark.parametrize("key, value", [("max_new_tokens", 8), ("max_turns", 2), ("max_episode_tokens", 64),
                                        ("environment_kind", "env")])
def test_a_parent_setting_a_domains_task_is_an_error(tmp_path, key, value):
    with pytest.raises(RecipeError, match=rf"rollout\.{key} would be ignored; fix: move them into the domain"):
        _parent(tmp_path, "", f"rollout: {{{key}: {value}}}\n")


def test_a_domain_agreeing_with_the_parent_or_overridden_loads(tmp_path):
    recipe = _parent(tmp_path, "rollout: {temperature: 0.7, n_samples: 16}\n", "rollout: {temperature: 0.7}\n")
    (domain,) = load_domains(recipe)
    domain.close()
    recipe = _parent(tmp_path, "rollout: {temperature: 0.7}\n", overrides=", overrides: [rollout.temperature=1.0]")
    (domain,) = load_domains(recipe)
    assert domain.recipe.rollout.temperature == 1.0
    domain.close()


def test_a_pipeline_checks_its_generalist_stage_before_any_stage_runs(tmp_path):
    """pipeline.generalist_overrides make the generalist stage's recipe: a domain that disagrees with it is
    refused when the pipeline starts, not after the expert stages."""
    from mispo.pipeline import Pipeline

    recipe = _parent(tmp_path, "rollout: {temperature: 1.0}\n", "pipeline: {generalist_overrides: "
                     "[rollout.temperature=0.7]}\n")
    with pytest.raises(RecipeError, match=r"sets rollout\.temperature = 1\.0.*parent's rollout\.temperature = 0\.7"):
        Pipeline(recipe, tmp_path / "run")
    assert Pipeline(_parent(tmp_path, "rollout: {temperature: 1.0}\n", "pipeline: {}\n"), tmp_path / "run")
