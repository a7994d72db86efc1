"""rewards.math: boxed answers checked with math-verify, in the main thread and in worker threads."""

import threading

import pytest

from mispo.reward_runner import RewardRunner
from rewards.math import last_boxed, score

CASES = [
    ("first \\boxed{3}, no wait: \\boxed{12}", "12", 1.0),   # last box wins
    ("\\boxed{12}", 12, 1.0),                                 # int gold
    ("\\boxed{12.0}", "12", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{2/4}", "\\frac{1}{2}", 1.0),
    ("\\boxed{3/4}", "$\\frac{3}{4}$", 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),                        # intervals
    ("\\boxed{[1, 2]}", "(1,2]", 0.0),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0),                # sets
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{13}", "12", 0.0),
    ("The answer is 12.", "12", 0.0),                         # no box: no answer
    ("\\boxed{12", "12", 0.0),                                # unclosed box
]


@pytest.mark.parametrize("completion, gold, expected", CASES)
def test_main_thread(completion, gold, expected):
    assert score(prompt="q", completion=completion, answer=gold)["score"] == expected


def test_worker_threads_match_main_thread():
    got = {}

    def work():
        for i, (completion, gold, _) in enumerate(CASES):
            got[i] = score(prompt="q", completion=completion, answer=gold)["score"]

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert [got[i] for i in range(len(CASES))] == [c[2] for c in CASES]


def test_through_the_runner():
    rows = [{"id": i, "prompt": "q", "completion": c, "answer": g} for i, (c, g, _) in enumerate(CASES)]
    out = RewardRunner(score, timeout_s=60).score(rows)
    assert out.scores == [c[2] for c in CASES]
    assert out.metrics["reward/has_answer"] == pytest.approx(12 / 14)


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
