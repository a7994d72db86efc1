"""recipes/gpu/math_gsm8k.yaml, checked offline: it parses as shipped (hub model name, hf: data), its data
mapping and reward score GSM8K-format rows, and `mispo plan` on it (with the model's config.json written
here by transformers' Qwen2Config, as the hub has it) fits its GPUs."""

import json
from pathlib import Path

import pytest

from mispo.config import load_recipe
from mispo.data import load_rows
from mispo.plan import plan_file
from mispo.scoring.plugins import load_reward
from mispo.scoring.reward_runner import RewardRunner

RECIPE = Path(__file__).resolve().parents[2] / "recipes/gpu/math_gsm8k.yaml"
GSM8K_ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                         "May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                       "altogether in April and May.\n#### 72"}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Qwen2.5-1.5B-Instruct's config.json (its published architecture), no weights: the plan reads only it."""
    from transformers import Qwen2Config

    d = tmp_path_factory.mktemp("qwen2.5-1.5b-instruct")
    Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True, rms_norm_eps=1e-6).save_pretrained(d)
    return d


def test_recipe_parses_as_shipped():
    recipe = load_recipe(RECIPE)
    assert recipe.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (recipe.data.train, recipe.data.eval) == ("hf:openai/gsm8k:main@train", "hf:openai/gsm8k:main@test")
    res = recipe.resources  # one GPU, shared by the learner and the engine
    assert res.gpus_per_node == res.actor_gpus == res.rollout_gpus == 1 and res.colocate
    assert recipe.learner.critic is None and recipe.algorithm.advantage == "grpo"


def test_gsm8k_rows_map_and_score(tmp_path):
    recipe = load_recipe(RECIPE)
    (tmp_path / "train.jsonl").write_text(json.dumps(GSM8K_ROW) + "\n")
    rows = load_rows(f"hf:{tmp_path}", None, "train", recipe.data)  # through datasets, the recipe's mapping
    assert rows == [{"prompt": GSM8K_ROW["question"], "answer": GSM8K_ROW["answer"]}]
    specs = [{k: v for k, v in p.model_dump(exclude_none=True).items() if v != {}} for p in recipe.reward.plugins]
    runner = RewardRunner(load_reward(specs, field="reward.plugins"), timeout_s=60)  # as Domain.load builds it
    answers = ["48/2 = 24 in May, so \\boxed{72}", "24 in May. The answer is 72.", "So 48 + 24 = 72", "\\boxed{71}"]
    out = runner.score([{**rows[0], "completion": a} for a in answers])
    assert out.scores == [1.0, 1.0, 1.0, 0.0]


def test_plan_fits(qwen_dir):
    plan = plan_file(RECIPE, [f"model.path={qwen_dir}"])
    assert 1.5e9 < plan.model["total_params"] < 1.6e9  # Qwen2.5-1.5B: 1.54B with tied embeddings
    assert [r.role for r in plan.roles] == ["actor", "rollout"]
    assert plan.fits, plan.to_dict()
    # on the shared GPU the learner's budget is what the engine leaves: the two together fit in one GPU
    actor, rollout = plan.roles
    two_gpus = plan_file(RECIPE, [f"model.path={qwen_dir}", "resources.colocate=false", "resources.gpus_per_node=2"])
    assert actor.budget == pytest.approx(two_gpus.role("actor").budget - 0.3 * 80 * 2**30)
    assert "shares its GPU with a rollout engine" in actor.detail
    assert actor.total + 0.3 * 80 * 2**30 <= 80 * 2**30
