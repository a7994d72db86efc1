"""Loading reward / environment plugins named in a recipe, with errors that say how to fix them."""

import sys
import textwrap

import pytest

from mispo.scoring.plugins import (ENVIRONMENT_GROUP, PluginError, build_plugin, load_function, load_object,
                           load_reward)
from mispo.scoring.reward_runner import CombinedReward


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompt, completion, **row):
            return len(completion)

        def too_narrow(completion):
            return 1.0

        def broken_signature(text):
            return 1.0

        async def async_reward(**kwargs):
            return 0.5

        NOT_CALLABLE = 3
    """))
    (tmp_path / "bad_import.py").write_text("raise RuntimeError('boom at import')\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward: my_rewards.py:length\n")
    return tmp_path, str(recipe)


def test_module_spec():
    import rewards.math

    assert load_function("rewards.math:score") is rewards.math.score


def test_file_spec_relative_to_recipe(recipe_dir, monkeypatch, tmp_path_factory):
    _, recipe = recipe_dir
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    fn = load_function("my_rewards.py:length", source=recipe)
    assert fn(prompt="p", completion="abc") == 3
    assert load_function("my_rewards.py:async_reward", source=recipe)


@pytest.mark.parametrize("spec, needles", [
    ("my_rewards.py:missing", ["has no attribute 'missing'", "length"]),
    ("nowhere.py:f", ["file 'nowhere.py' not found", "fix the path"]),
    ("my_rewards.py:NOT_CALLABLE", ["is a int, not a function"]),
    ("my_rewards.py:broken_signature", ["does not accept prompt, completion",
                                        "def broken_signature(prompt, completion, **row)"]),
    ("my_rewards.py:too_narrow", ["does not accept prompt"]),
    ("bad_import.py:f", ["RuntimeError: boom at import", "fix the error"]),
    ("no_such_module_xyz:f", ["cannot import module 'no_such_module_xyz'", "PYTHONPATH"]),
    ("unregistered", ["entry point", "rewards.math:score"]),
    ("", ["expected a string"]),
])
def test_errors_name_field_file_and_fix(recipe_dir, spec, needles):
    _, recipe = recipe_dir
    with pytest.raises(PluginError) as err:
        load_function(spec, field="reward", source=recipe)
    msg = str(err.value)
    assert "recipe field 'reward'" in msg and recipe in msg
    for needle in needles:
        assert needle in msg


def test_entry_point_group(tmp_path, monkeypatch):
    pkg = tmp_path / "mispo_fake_plugin_pkg.py"
    pkg.write_text("def score(prompt, completion, **row):\n    return 0.25\n"
                   "class Env:\n    pass\n")
    dist = tmp_path / "mispo_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mispo-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[mispo.rewards]\nfake = mispo_fake_plugin_pkg:score\n\n"
        "[mispo.environments]\nfake_env = mispo_fake_plugin_pkg:Env\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_function("fake")
    assert fn(prompt="", completion="") == 0.25
    env_cls = load_object("fake_env", field="environment", group=ENVIRONMENT_GROUP)
    assert env_cls.__name__ == "Env"
    sys.modules.pop("mispo_fake_plugin_pkg", None)


def test_combined_reward_from_recipe_list(recipe_dir):
    _, recipe = recipe_dir
    combined = load_reward([{"fn": "my_rewards.py:length", "weight": 2.0},
                            {"fn": "rewards.math:score", "weight": 0.5, "name": "acc"}],
                           source=recipe)
    assert isinstance(combined, CombinedReward)
    assert [(w, n) for _, w, n in combined.parts] == [(2.0, "length"), (0.5, "acc")]
    with pytest.raises(PluginError, match=r"reward\[1\].weight"):
        load_reward(["rewards.math:score", {"fn": "rewards.code:score", "weight": "high"}])
    with pytest.raises(PluginError, match="unknown keys"):
        load_reward([{"fn": "rewards.math:score", "wieght": 1}])
    with pytest.raises(PluginError, match="repeat"):
        load_reward(["rewards.math:score", "rewards.math:score"])


def test_factory_with_args():
    judge = build_plugin("rewards.preference:GenerativeJudge",
                         {"generate": lambda prompts: ["[[A]]"] * len(prompts)})
    assert callable(judge)
    with pytest.raises(PluginError, match="does not accept args"):
        build_plugin("rewards.preference:GenerativeJudge", {"nope": 1})
    with pytest.raises(PluginError, match="raised ValueError"):
        build_plugin("rewards.preference:GenerativeJudge", {})
