"""`mispo eval`: the unbiased pass@k estimator against its definition, argument errors, and (slow) the
command on the tiny recipe with the tiny Step3p5 checkpoint: table, JSON fields, pass@k from the samples."""

import itertools
import json
import shutil
from pathlib import Path

import pytest

from mispo import cli
from mispo.evaluate import k_values, pass_at_k

ROOT = Path(__file__).resolve().parents[2]
# A reward that splits a random model's samples into correct and wrong ones (parity of the answer's length),
# so pass@k is computed on a mix rather than on all-zeros.
PARITY_REWARD = "def score(prompt='', completion='', **row):\n    return float(len(completion) % 2 == 0)\n"


@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_k_values_and_bad_arguments(capsys):
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(10) == [1, 2, 4, 8, 10]
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(2, 3, 1)
    assert "eval" in cli.build_parser().format_help()
    assert cli.main(["eval", "recipes/math_expert.yaml", "--samples", "0"]) == 2
    assert "--samples = 0" in capsys.readouterr().err


@pytest.mark.slow  # starts Ray and a vLLM engine
def test_eval_on_the_tiny_recipe(tiny_checkpoint, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    (tmp_path / "reward.py").write_text(PARITY_REWARD)
    overrides = ["data.eval_size=12", f"reward.plugins=[{{fn: {tmp_path}/reward.py:score}}]"]
    import ray

    try:  # in this process: the command's Ray cluster must not outlive the test (others start their own)
        assert cli.main(["eval", str(ROOT / "recipes/math_expert.yaml"), *overrides, "--model", str(model),
                         "--samples", "4", "--verbose"]) == 0  # (quiet mode would set up this process's logging)
    finally:
        ray.shutdown()
    table = capsys.readouterr().out
    assert "pass@4" in table and "math_expert" in table
    report = json.loads((model / "eval_math_expert.json").read_text())  # the default place: the model folder
    assert (report["model"], report["samples"], report["temperature"]) == (str(model), 4, 1.0)
    r = report["domains"]["math_expert"]
    assert set(r) == {"eval_rows", "greedy_accuracy", "pass@1", "pass@2", "pass@4", "correct", "greedy_answers"}
    assert len(r["greedy_answers"]) == r["eval_rows"]
    assert {"prompt", "completion", "reward"} <= set(r["greedy_answers"][0])
    correct = r["correct"]
    assert r["eval_rows"] == len(correct) == 12 and all(0 <= c <= 4 for c in correct)
    assert 0 < sum(correct) < 4 * 12  # a mix of right and wrong samples
    assert r["pass@1"] == pytest.approx(sum(correct) / (4 * 12))           # the mean per-sample correctness
    assert r["pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 12)  # any of the 4 right
    assert r["pass@1"] <= r["pass@2"] <= r["pass@4"]
    assert r["greedy_accuracy"] in {i / 12 for i in range(13)}
