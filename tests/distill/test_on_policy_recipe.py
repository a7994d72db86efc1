"""On-policy distillation is a trainer run: the recipe `student_recipe` builds from a merge recipe (fast, no engines;
the run itself: tests/distill/test_merge_e2e.py and tests/trainer/test_fit_with_fake_roles.py)."""

import json
from pathlib import Path

from mispo.config import load_recipe
from mispo.distill.merge import Merge
from mispo.distill.on_policy import student_recipe
from mispo.loop.domains import load_domains
from mispo.models.step3p5.tiny import tiny_config, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_the_student_recipe_trains_every_expert_domain_on_its_teachers_reverse_kl(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path / "student", seed=0, config=tiny_config(hidden_size=64, num_hidden_layers=2))
    math_expert = write_tiny_checkpoint(tmp_path / "math", seed=1, config=tiny_config(hidden_size=64, num_hidden_layers=2))
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(json.dumps({
        "name": "m", "model": {"path": str(tiny)},
        "rollout": {"max_new_tokens": 24, "temperature": 0.7},  # max_new_tokens: each domain's own wins
        "algorithm": {"advantage": "grpo", "traj_bounds": [0.9, 1.1]}, "learner": {"critic": None},
        "trainer": {"save_every": 3, "mode": "async", "max_staleness": 1},
        "merge": {"method": "on_policy", "steps": 7, "lr": 3e-4, "temperature": 0.9, "samples_per_prompt": 2,
                  "prompts_per_step": 6, "eval": False,
                  "experts": {"math": {"checkpoint": str(math_expert), "recipe": str(ROOT / "recipes/math_expert.yaml"),
                                       "weight": 2},
                              "tool": {"checkpoint": str(tiny), "recipe": str(ROOT / "recipes/tool_expert.yaml"),
                                       "overrides": ["data.eval_size=4"]}}}}))
    merge = Merge(load_recipe(str(recipe)), tmp_path / "out")
    r = student_recipe(merge)
    assert r.model.path == str(tiny) and r.warmup is None
    assert r.algorithm.advantage == "reverse_kl" and r.algorithm.policy_loss == "mispo"
    assert r.algorithm.teachers == {"math": str(math_expert), "tool": str(tiny)}
    assert tuple(r.algorithm.traj_bounds) == (0.9, 1.1)  # the merge recipe's bands
    assert (r.rollout.temperature, r.rollout.n_samples, r.rollout.prompts_per_step) == (0.9, 2, 6)
    assert (r.trainer.max_steps, r.trainer.eval_every, r.trainer.save_every, r.trainer.mode) == (7, 0, 3, "async")
    assert r.learner.actor.lr == 3e-4 and r.learner.critic is None
    domains = load_domains(r)  # every domain's own task, drawn at the merge's temperature
    assert [(d.name, d.weight) for d in domains] == [("math", 2.0), ("tool", 1.0)]
    assert all(d.sampling.temperature == 0.9 for d in domains)
    assert domains[0].max_new_tokens == load_recipe(str(ROOT / "recipes/math_expert.yaml")).rollout.max_new_tokens
