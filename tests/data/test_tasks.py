"""Built-in task generators: determinism, disjoint splits, correct answers, SFT targets the rewards accept."""

import re

import pytest

import rewards.math
import rewards.tool
from mispo.tasks import get_task
from mispo.tasks.arithmetic import split_of

EXPR = re.compile(r"(\d+)([-+*/])(\d+)")
ALL_OPS = {"operations": "+-*/", "digits": [1, 3]}


def _value(prompt: str) -> int:
    a, op, b = EXPR.search(prompt).groups()
    a, b = int(a), int(b)
    if op == "/":
        assert a % b == 0, prompt
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


@pytest.mark.parametrize("name", ["arithmetic", "calculator"])
def test_deterministic_and_seeded(name):
    task = get_task(name)
    for fn in (task.train_rows, task.eval_rows, task.sft_rows):
        assert fn(50, 3) == fn(50, 3)
        assert fn(50, 3) != fn(50, 4)
    assert task.train_rows(20, 0) == task.train_rows(40, 0)[:20]  # a prefix: n only truncates


@pytest.mark.parametrize("name,opts", [("arithmetic", {}), ("arithmetic", ALL_OPS), ("calculator", {})])
def test_train_eval_disjoint(name, opts):
    task = get_task(name)
    o = task.options(opts)
    train = {r["prompt"] for seed in range(3) for r in task.train_rows(2000, seed, **opts)}
    sft = {r["prompt"] for r in task.sft_rows(2000, 7, **opts)}
    evals = [r["prompt"] for r in task.eval_rows(100, 0, **opts)]
    assert len(set(evals)) == len(evals) == 100  # distinct eval problems
    assert not (train | sft) & set(evals)
    assert all(split_of(EXPR.search(p).group(0), o["eval_fraction"]) == "eval" for p in evals)


@pytest.mark.parametrize("name,opts", [("arithmetic", {}), ("arithmetic", ALL_OPS),
                                       ("arithmetic", {"negative": True}), ("calculator", {})])
def test_answers_correct(name, opts):
    rows = get_task(name).train_rows(500, 1, **opts) + get_task(name).eval_rows(50, 1, **opts)
    for r in rows:
        assert r["answer"] == str(_value(r["prompt"]))
    if not opts.get("negative"):
        assert all(int(r["answer"]) >= 0 for r in rows)
    else:
        assert any(int(r["answer"]) < 0 for r in rows)


def test_arithmetic_defaults_are_short():
    rows = get_task("arithmetic").train_rows(1000, 0)
    assert {EXPR.search(r["prompt"]).group(2) for r in rows} == {"+", "-"}
    assert max(len(r["prompt"]) for r in rows) <= 8  # "99+99=": fits the tiny model's context
    assert all(r["prompt"].endswith("=") for r in rows)


def test_sft_completion_scores_one_with_math_reward():
    for r in get_task("arithmetic").sft_rows(40, 0, **ALL_OPS):
        assert r["completion"] == "\\boxed{" + r["answer"] + "}"
        result = rewards.math.score(prompt=r["prompt"], completion=r["completion"], answer=r["answer"])
        assert result["score"] == 1.0


def test_calculator_sft_rows():
    for r in get_task("calculator").sft_rows(20, 0):
        expr = EXPR.search(r["prompt"]).group(0)
        assert f"<expression>{expr}</expression>" in r["tool_call"]
        result = rewards.tool.score(prompt=r["prompt"], completion=r["completion"], answer=r["answer"])
        assert result["score"] == 1.0


def test_bad_options_and_names():
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="data.builtin.colour"):
        task.train_rows(5, 0, colour="red")
    with pytest.raises(ValueError, match="data.builtin.operations"):
        task.train_rows(5, 0, operations="+^")
    with pytest.raises(ValueError, match="data.builtin.digits"):
        task.train_rows(5, 0, digits=[3, 1])
    with pytest.raises(ValueError, match="eval_size"):  # 1-digit sums: too few eval problems
        task.eval_rows(100, 0, operations="+", digits=1)
    with pytest.raises(ValueError, match="builtin:arithmetic"):
        get_task("arithmetics")


def test_calculator_sft_answer_fraction_mixes_in_bare_final_answers():
    rows = get_task("calculator").sft_rows(400, 0, sft_answer_fraction=0.3, digits=[1, 2])
    tagged = [r for r in rows if r["completion"].startswith("<answer>")]
    assert 0.2 < len(tagged) / len(rows) < 0.4
    for r in rows:
        assert f"<expression>{r['prompt'][8:-1]}</expression>" in r["tool_call"]  # every episode calls the tool
        assert r["completion"] in (f"<answer>{r['answer']}</answer>", r["answer"])
    assert get_task("calculator").sft_rows(50, 0) == get_task("calculator").sft_rows(50, 0, sft_answer_fraction=1.0)


# ------------------------------------------------------------------ builtin:chain
def _chain_value(prompt: str) -> int:
    tokens = re.findall(r"\d+|[-+*]", prompt.rstrip("="))
    value = int(tokens[0])
    for op, b in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
    return value


@pytest.mark.parametrize("opts", [{}, {"operations": "+-*", "terms": 4, "digits": [1, 2]}])
def test_chain_rows_are_correct_and_disjoint(opts):
    task = get_task("chain")
    train = task.train_rows(500, 0, **opts)
    evals = task.eval_rows(30, 0, **opts)
    terms = task.options(opts)["terms"]
    for row in train + evals:
        assert len(re.findall(r"[-+*]", row["prompt"])) == terms - 1
        assert row["answer"] == str(_chain_value(row["prompt"]))
        assert _chain_value(row["prompt"]) >= 0  # '-' never goes below zero without `negative`
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


def test_chain_worked_completion_shows_running_values_and_scores_one():
    task = get_task("chain")
    assert task.steps("4+7+2") == "4+7=11,11+2=13"
    assert task.steps("12-3*2") == "12-3=9,9*2=18"  # left to right: running values, not precedence
    rows = task.sft_rows(40, 0)
    for row in rows:
        assert row["completion"] == f"{task.steps(row['prompt'][:-1])}\\boxed{{{row['answer']}}}"
        assert rewards.math.score(completion=row["completion"], answer=row["answer"])["score"] == 1.0
        assert len(row["completion"]) >= 18  # tens of tokens under the char tokenizer


def test_chain_weak_completions_score_zero_and_bad_terms_fail():
    task = get_task("chain")
    rows = task.sft_rows(200, 0, sft_boxed_fraction=0.3)
    weak = [r for r in rows if "boxed" not in r["completion"]]
    assert 0.5 < len(weak) / len(rows) < 0.9
    strict = rewards.math.scorer(boxed_only=True)  # what the recipes that teach \boxed{} reward
    assert all(strict(completion=r["completion"], answer=r["answer"])["score"] == 0.0 for r in weak)
    with pytest.raises(ValueError, match="data.builtin.terms"):
        task.train_rows(5, 0, terms=1)
    with pytest.raises(ValueError, match="no '/'"):
        task.train_rows(5, 0, operations="+/")
