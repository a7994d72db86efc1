"""rewards.tool: correct final answer, zeroed (or penalised) by malformed tool calls."""

from rewards.tool import final_answer, score

GOOD_CALL = "<tool_call><name>calc</name><arguments>2+3</arguments></tool_call>"
BAD_CALL = "<tool_call><arguments>2+3</arguments></tool_call>"


def test_correct_answer_with_good_calls():
    res = score(completion=GOOD_CALL + "\nresult 5\n<answer>5</answer>", answer="5")
    assert res == {"score": 1.0, "correct": 1, "has_answer": 1, "tool_calls": 1,
                   "malformed_tool_calls": 0}


def test_wrong_or_missing_answer():
    assert score(completion="<answer>6</answer>", answer="5")["score"] == 0.0
    assert score(completion="I think 5", answer="5")["has_answer"] == 0


def test_malformed_calls_zero_or_penalise():
    text = BAD_CALL + "\n<answer>5</answer>"
    assert score(completion=text, answer="5")["score"] == 0.0
    assert score(completion=text, answer="5", malformed_penalty=0.25)["score"] == 0.75
    # The environment's own count (e.g. unknown tools) takes precedence.
    assert score(completion="<answer>5</answer>", answer="5", malformed_tool_calls=2,
                 malformed_penalty=0.25)["score"] == 0.5


def test_answer_forms():
    assert score(completion="<answer> Paris. </answer>", answer="paris")["score"] == 1.0
    assert score(completion="<answer>\\frac{1}{2}</answer>", answer="0.5")["score"] == 1.0
    assert score(completion="so \\boxed{12}", answer=12)["score"] == 1.0
    # An <answer> inside a tool call's arguments is not the final answer.
    assert final_answer("<tool_call><name>x</name><arguments><answer>1</answer></arguments>"
                        "</tool_call> <answer>2</answer>") == "2"
