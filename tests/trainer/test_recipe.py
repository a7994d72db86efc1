"""Recipe schema: the shipped recipes validate; bad input names the key, the file, the line and the fix."""

from pathlib import Path

import pytest

from mispo.config import RecipeError, load_recipe

# recipes/step3p5_flash/ name a cluster checkpoint and data that do not exist here; tests/plan validates them
# with model.path and data.* pointed at files the test writes.
RECIPES = sorted(p for p in Path(__file__).resolve().parents[2].joinpath("recipes").rglob("*.yaml")
                 if "step3p5_flash" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_unknown_key_names_key_file_and_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\nrollout:\n  n_samples: 4\n  temprature: 0.7\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(f)
    msg = str(err.value)
    assert "rollout.temprature" in msg and f"{f}:4" in msg and "fix:" in msg


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("trainer:\n  max_steps: many\n")
    with pytest.raises(RecipeError, match=r"trainer\.max_steps .*r\.yaml:2"):
        load_recipe(f)


def test_dotted_overrides_apply_and_validate():
    recipe = load_recipe(None, ["trainer.max_steps=7", "rollout.temperature=0.5", "algorithm.policy_loss=ppo"])
    assert recipe.trainer.max_steps == 7 and recipe.rollout.temperature == 0.5
    assert recipe.algorithm.policy_loss == "ppo"
    with pytest.raises(RecipeError, match="trainer.max_steps"):
        load_recipe(None, ["trainer.max_steps=[1]"])
    with pytest.raises(RecipeError, match="key.sub=value"):
        load_recipe(None, ["trainer.max_steps"])


def test_missing_data_file_is_named(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("data:\n  train: nowhere.jsonl\n")
    with pytest.raises(RecipeError, match="data.train = 'nowhere.jsonl'.*no such file"):
        load_recipe(f)


def test_gae_without_critic_is_rejected():
    with pytest.raises(RecipeError, match="learner.critic"):
        load_recipe(None, ["learner.critic=null"])
    assert load_recipe(None, ["learner.critic=null", "algorithm.advantage=grpo"]).learner.critic is None


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_recipe_reference_is_current():
    import runpy

    root = Path(__file__).resolve().parents[2]
    render = runpy.run_path(str(root / "scripts" / "recipe_docs.py"))["render"]
    assert (root / "docs" / "recipes.md").read_text() == render(), "run: python scripts/recipe_docs.py"


@pytest.mark.parametrize("override, field", [
    ("rollout.n_samples=0", "rollout.n_samples"),
    ("learner.actor.lr=-1", "learner.actor.lr"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("learner.micro_batch_tokens=0", "learner.micro_batch_tokens"),
    ("rollout.prompts_per_step=0", "rollout.prompts_per_step"),
    ("algorithm.gamma=1.5", "algorithm.gamma"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
])
def test_numeric_fields_out_of_range_are_named(override, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        load_recipe(None, [override])


def test_numeric_fields_at_their_bounds_are_accepted():
    r = load_recipe(None, ["rollout.n_samples=1", "algorithm.advantage=gae", "trainer.eval_every=0",
                           "rollout.top_p=1.0", "algorithm.gamma=0"])
    assert r.rollout.n_samples == 1 and r.trainer.eval_every == 0


def test_grpo_loss_with_gae_advantages_is_refused():
    with pytest.raises(RecipeError, match="would run PPO with a critic"):
        load_recipe(None, ["algorithm.policy_loss=grpo", "algorithm.advantage=gae"])
    assert load_recipe(None, ["algorithm.policy_loss=grpo", "algorithm.advantage=grpo"]).algorithm.policy_loss == "grpo"


def test_optimizer_offload_without_zero_is_refused():
    with pytest.raises(RecipeError, match="resources.offload_optimizer .* learner.zero_stage = 0"):
        load_recipe(None, ["resources.offload_optimizer=true", "learner.zero_stage=0"])
    assert load_recipe(None, ["resources.offload_optimizer=true", "learner.zero_stage=1"]).resources.offload_optimizer


def test_max_model_len_has_one_owner():
    assert load_recipe(None, ["rollout.max_model_len=4096"]).rollout.max_model_len == 4096
    for key, owner in [("max_model_len", "rollout.max_model_len"), ("seed", "trainer.seed")]:
        with pytest.raises(RecipeError, match=rf"engine_kwargs\.{key} is set by {owner}"):
            load_recipe(None, [f"rollout.engine_kwargs={{{key}: 7}}"])


def test_python_m_mispo_runs_the_train_command(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mispo", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    said = " ".join((done.stdout + done.stderr).split())  # the console wraps long lines
    assert "missing.yaml does not exist" in said and "Traceback" not in done.stderr


def test_rollout_data_parallel_is_refused_by_train_before_anything_starts(tmp_path):
    """vllm.LLM refuses data_parallel_size > 1: a run must say so, not hold idle GPUs (`mispo plan` may size it)."""
    from mispo.config import RecipeError
    from mispo.loop.trainer import Trainer

    recipe = load_recipe("recipes/math_expert.yaml", ["resources.gpus_per_node=8", "resources.actor_gpus=4",
                                                      "resources.rollout_gpus=4", "resources.rollout_data_parallel=2",
                                                      "rollout.num_workers=2"])
    with pytest.raises(RecipeError, match="resources.rollout_data_parallel = 2.*fix: rollout_data_parallel: 1"):
        Trainer(recipe, tmp_path / "run")
