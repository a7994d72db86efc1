"""rewards.math: answers found as math-verify finds them (or boxes only) and checked with math-verify, in the
main thread and in worker threads; the strict option through the recipe's plugin factory form."""

import threading

import pytest

from mispo.scoring.reward_runner import RewardRunner
from mispo.scoring.plugins import load_reward
from rewards.math import last_boxed, score, scorer

# (completion, gold, score with the standard extraction, score with boxed_only)
CASES = [
    ("first \\boxed{3}, no wait: \\boxed{12}", "12", 1.0, 1.0),   # last box wins
    ("\\boxed{12}", 12, 1.0, 1.0),                                 # int gold
    ("\\boxed{12.0}", "12", 1.0, 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
    ("\\boxed{2/4}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{3/4}", "$\\frac{3}{4}$", 1.0, 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0, 1.0),                        # intervals
    ("\\boxed{[1, 2]}", "(1,2]", 0.0, 0.0),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0, 1.0),                # sets
    ("\\boxed{x = 3}", "3", 1.0, 1.0),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0, 1.0),
    ("\\boxed{13}", "12", 0.0, 0.0),
    ("\\boxed{12} but then I got 13", "12", 1.0, 1.0),               # a box beats a later number
    ("The answer is 12.", "12", 1.0, 0.0),                         # answer phrases: standard only
    ("The final answer is 42", "42", 1.0, 0.0),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", 1.0, 0.0),
    ("Answer: 42", "42", 1.0, 0.0),
    ("answer: 7, then 40 more", "7", 1.0, 0.0),                     # the phrase beats a later number
    ("6*7 = 42", "42", 1.0, 0.0),                                  # trailing number
    ("so 41 then 42.", "42", 1.0, 0.0),
    ("we get $\\frac{6}{8}$", "3/4", 1.0, 0.0),                    # trailing LaTeX fraction
    ("The answer is 41.", "42", 0.0, 0.0),                         # wrong
    ("no idea", "42", 0.0, 0.0),                                   # nothing to extract
    ("\\boxed{12", "12", 0.0, 0.0),                                # unclosed box
    ("48/2 = 24 clips in May, 72 in all", "She sold 48/2 = <<48/2=24>>24.\n#### 72", 1.0, 0.0),  # GSM8K gold
]
STRICT = scorer(boxed_only=True)


def has_no_answer(completion: str, boxed_only: bool) -> bool:
    return score(completion=completion, answer="1", boxed_only=boxed_only)["has_answer"] == 0


@pytest.mark.parametrize("completion, gold, standard, boxed", CASES)
def test_main_thread(completion, gold, standard, boxed):
    assert score(prompt="q", completion=completion, answer=gold)["score"] == standard
    assert STRICT(prompt="q", completion=completion, answer=gold)["score"] == boxed


def test_has_answer():
    assert has_no_answer("no idea", False) and has_no_answer("The answer is 12.", True)
    assert not has_no_answer("The answer is 12.", False) and not has_no_answer("\\boxed{2}", True)


def test_worker_threads_match_main_thread():
    got = {}

    def work():
        for i, (completion, gold, _, _) in enumerate(CASES):
            got[i] = (score(prompt="q", completion=completion, answer=gold)["score"],
                      STRICT(prompt="q", completion=completion, answer=gold)["score"])

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert [got[i] for i in range(len(CASES))] == [(c[2], c[3]) for c in CASES]


@pytest.mark.parametrize("args, column", [(None, 2), ({"boxed_only": True}, 3), ({"boxed_only": False}, 2)])
def test_through_the_runner_as_a_recipe_names_it(args, column):
    spec = {"fn": "rewards.math:score"} if args is None else {"fn": "rewards.math:scorer", "args": args}
    rows = [{"id": i, "prompt": "q", "completion": c[0], "answer": c[1]} for i, c in enumerate(CASES)]
    out = RewardRunner(load_reward([spec], field="reward.plugins"), timeout_s=60).score(rows)
    assert out.scores == [c[column] for c in CASES]


def test_bad_option_is_a_plugin_error():
    with pytest.raises(ValueError, match="boxed_only"):
        load_reward([{"fn": "rewards.math:scorer", "args": {"boxed_only": "yes"}}], field="reward.plugins")
    with pytest.raises(ValueError, match="boxd_only"):
        load_reward([{"fn": "rewards.math:scorer", "args": {"boxd_only": True}}], field="reward.plugins")


def test_bundled_math_recipes_keep_the_boxed_only_signal():
    """The tiny recipe's warm-up answers 70% with a bare number, which RL must not reward."""
    from pathlib import Path

    from mispo.config import load_recipe

    root = Path(__file__).resolve().parents[2]
    for name in ("recipes/math_expert.yaml", "recipes/step3p5_flash/math_expert.yaml"):
        overrides = ["model.path=builtin:tiny", "data.train=builtin:arithmetic", "data.eval=null"]
        plugins = load_recipe(root / name, overrides).reward.plugins
        assert [(p.fn, p.args) for p in plugins] == [("rewards.math:scorer", {"boxed_only": True})], name


def test_runaway_expression_is_bounded():
    res = score(completion="\\boxed{10^{10^{10}} + 1}", answer="2", timeout_s=1)
    assert res["score"] == 0.0


def test_missing_gold_is_an_error():
    with pytest.raises(ValueError, match="'answer'"):
        score(prompt="q", completion="\\boxed{1}")


def test_last_boxed():
    assert last_boxed("\\boxed{a} \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed 5.") == "5"
    assert last_boxed("nothing") is None
