"""builtin:functions: determinism, disjoint splits, SFT bodies the sandboxed code reward scores 1.0."""

from concurrent.futures import ThreadPoolExecutor

import pytest

import rewards.code
from mispo.data import load_rows
from mispo.config import DataConfig
from mispo.tasks import get_task
from mispo.tasks.arithmetic import split_of
from mispo.tasks.functions import FAMILIES, make_row

TASK = get_task("functions")


def _score(row: dict, completion: str) -> float:
    fields = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    return rewards.code.score(prompt=row["prompt"], completion=completion, **fields)["score"]


def _scores(rows: list[dict], completions: list[str]) -> list[float]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(_score, rows, completions))


def test_deterministic_and_seeded():
    for fn in (TASK.train_rows, TASK.eval_rows, TASK.sft_rows):
        assert fn(40, 3) == fn(40, 3)
        assert fn(40, 3) != fn(40, 4)
    assert TASK.train_rows(20, 0) == TASK.train_rows(40, 0)[:20]  # a prefix: n only truncates
    assert TASK.eval_rows(20, 0) == TASK.eval_rows(40, 0)[:20]


def test_train_sft_and_eval_problems_are_disjoint():
    o = TASK.options({})
    train = {r["task_id"] for seed in range(3) for r in TASK.train_rows(3000, seed)}
    sft = {r["task_id"] for r in TASK.sft_rows(3000, 7, sft_return_fraction=0.3)}
    evals = [r["task_id"] for r in TASK.eval_rows(100, 0)]
    assert len(set(evals)) == len(evals) == 100  # distinct eval problems
    assert not (train | sft) & set(evals)
    assert not {r["prompt"] for r in TASK.train_rows(3000, 0)} & {r["prompt"] for r in TASK.eval_rows(100, 0)}
    assert all(split_of(t, o["eval_fraction"]) == "eval" for t in evals)
    assert len(train) > 300  # most train problems show up: the split is by problem, not by family
    assert {r["entry_point"] for r in TASK.eval_rows(100, 0)} >= {"scale", "combine", "clip"}


def test_rows_are_short_and_humaneval_shaped():
    rows = TASK.problems("train", TASK.options({})) + TASK.problems("eval", TASK.options({}))
    assert len(rows) == len({r["task_id"] for r in rows}) == len({r["prompt"] for r in rows})
    for r in rows:
        assert r["prompt"].startswith(f"def {r['entry_point']}(") and r["prompt"].endswith('."""\n')
        assert r["test"].startswith("def check(candidate):\n") and r["test"].count("assert") >= 4
        assert r["answer"].startswith("    return ")
    assert max(len(r["answer"]) for r in rows) <= 40 and max(len(r["prompt"]) for r in rows) <= 80


def test_every_sft_completion_scores_one_through_the_sandbox():
    rows = TASK.sft_rows(64, 0)
    assert all(r["completion"] == r["answer"] for r in rows)
    one_per_family = [make_row(*FAMILIES[f]()[0]) for f in FAMILIES]
    rows += one_per_family
    assert _scores(rows, [r.get("completion", r["answer"]) for r in rows]) == [1.0] * len(rows)


def test_wrong_completions_score_below_one():
    row = make_row("scale", "x", "x times 3 plus 2", "x*3+2", [0, 1, 5])
    wrong = ["    return x*3+3",            # off by one
             "    return x*2+2",            # wrong constant
             "    print(x*3+2)",            # the weak SFT format: returns None
             "    return x*3+2 if x else 0",  # right except at x = 0
             "    return"]
    scores = _scores([row] * len(wrong), wrong)
    assert all(s < 1.0 for s in scores), scores
    assert _score(row, "def scale(x):\n    return x*3+2\n") == 1.0  # a whole function is accepted too


def test_return_fraction_mixes_in_printing_bodies_that_score_zero():
    rows = TASK.sft_rows(400, 0, sft_return_fraction=0.3)
    good = [r for r in rows if r["completion"] == r["answer"]]
    weak = [r for r in rows if r["completion"] != r["answer"]]
    assert 0.2 < len(good) / len(rows) < 0.4
    assert all(r["completion"] == "    print(" + r["answer"][len("    return "):] + ")" for r in weak)
    assert _scores(weak[:16], [r["completion"] for r in weak[:16]]) == [0.0] * 16
    # the problems drawn do not depend on the format mix
    assert [r["task_id"] for r in rows] == [r["task_id"] for r in TASK.sft_rows(400, 0)]


def test_loads_as_a_builtin_data_source():
    config = DataConfig(train="builtin:functions", eval="builtin:functions", eval_size=50,
                        builtin={"sft_return_fraction": 0.3})
    evals = load_rows("builtin:functions", None, "eval", config)
    sft = load_rows("builtin:functions", None, "sft", config, 100)
    assert len(evals) == 50 and len(sft) == 100 and all("completion" in r for r in sft)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="data.builtin.colour"):
        TASK.train_rows(5, 0, colour="red")
    with pytest.raises(ValueError, match="data.builtin.families.*affine"):
        TASK.train_rows(5, 0, families=["affine", "sorting"])
    with pytest.raises(ValueError, match="data.builtin.sft_return_fraction"):
        TASK.sft_rows(5, 0, sft_return_fraction=1.5)
    with pytest.raises(ValueError, match="eval_size"):  # 8 string-repeat problems: too few to hold out 50
        TASK.eval_rows(50, 0, families=["strings"])
