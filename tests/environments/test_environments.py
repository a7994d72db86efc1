"""Tool-use and code environments, driven turn by turn."""

from environments.code_env import CodeEnv
from environments.tool_env import ToolEnv


def test_tool_env_calls_tools_then_scores():
    env = ToolEnv()
    prompt = env.reset({"question": "What is 6*7?", "answer": "42"})
    assert "calc" in prompt and "What is 6*7?" in prompt
    res = env.step("<tool_call><name>calc</name><arguments><expression>6*7</expression>"
                   "</arguments></tool_call>", [1, 2, 3])
    assert not res.done and '<tool_response name="calc">\n42\n</tool_response>' == res.observation
    res = env.step("<tool_call><name>python</name><arguments><code>print(6*7)</code></arguments>",
                   [4])
    assert not res.done and "42" in res.observation
    res = env.step("<answer>42</answer>", [5])
    assert res.done and res.reward == 1.0 and res.info["tool_calls"] == 2


def test_tool_env_malformed_and_unknown_calls_are_answered_and_cost_reward():
    env = ToolEnv()
    env.reset({"question": "q", "answer": "5"})
    res = env.step("<tool_call><arguments>2+3</arguments></tool_call>"
                   "<tool_call><name>search</name></tool_call>", [])
    assert not res.done
    assert "without a tool name" in res.observation and "unknown tool 'search'" in res.observation
    res = env.step("<answer>5</answer>", [])
    assert res.done and res.reward == 0.0 and res.info["correct"] == 1
    assert res.info["malformed_tool_calls"] == 2

    env = ToolEnv()
    env.reset({"question": "q", "answer": "5", "malformed_penalty": 0.25})
    env.step("<tool_call><arguments>2+3</arguments></tool_call>", [])
    assert env.step("<answer>5</answer>", []).reward == 0.75


def test_tool_env_limits_calls_per_turn():
    env = ToolEnv(max_calls_per_turn=2)
    env.reset({"question": "q", "answer": "1"})
    call = "<tool_call><name>calc</name><arguments>1+1</arguments></tool_call>"
    res = env.step(call * 3, [])
    assert res.observation.count("<tool_response") == 3 and "at most 2" in res.observation


HE_PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
HE_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"


def test_code_env_feedback_then_success():
    env = CodeEnv(max_attempts=3)
    row = {"prompt": HE_PROMPT, "test": HE_TEST, "entry_point": "add"}
    assert env.reset(row).startswith(HE_PROMPT)
    res = env.step("```python\ndef add(a, b):\n    return a * b + 1\n```", [])
    assert not res.done and "passed 0/1" in res.observation
    assert "candidate(1, 2) == 3" in res.observation or "candidate(2, 2) == 4" in res.observation
    res = env.step("```python\ndef add(a, b):\n    return a + b\n```", [])
    assert res.done and res.reward == 1.0 and res.info["attempts"] == 2


def test_code_env_stdio_partial_credit_after_last_attempt():
    env = CodeEnv(max_attempts=1)
    env.reset({"prompt": "Print the double of n.",
               "tests": [{"input": "2", "output": "4"}, {"input": "0", "output": "0"}]})
    res = env.step("```python\nprint(int(input()) ** 3)\n```", [])
    assert res.done and res.reward == 0.5
