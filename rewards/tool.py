"""Tool-use reward: a correct final answer, with well-formed tool calls.

``score(prompt, completion, answer, **row) -> {"score", "correct", "has_answer", "tool_calls",
"malformed_tool_calls"}``

- ``completion`` is the model's text over the episode (all its turns). The final answer is the
  last ``<answer>...</answer>``, else the last ``\\boxed{...}``, outside any tool call.
- ``correct``: the answer equals the gold ``answer`` as normalised text (case, spaces, a final
  period ignored) or, for math, by math-verify equivalence (see rewards.math).
- ``score = correct * max(0, 1 - malformed_penalty * malformed_tool_calls)``. With the default
  ``malformed_penalty = 1.0`` (row field) any malformed call zeroes the reward; 0.25 would take a
  quarter per bad call. The count of malformed calls is taken from the row field
  ``malformed_tool_calls`` when an environment supplies it (it also counts calls to unknown
  tools), else counted here with rewards.toolcalls.
"""

from __future__ import annotations

import re

from rewards.math import equivalent, last_boxed
from rewards.toolcalls import MalformedCall, parse_tool_calls

_ANSWER = re.compile(r"<\s*answer\s*>(.*?)(?:<\s*/\s*answer\s*>|\Z)", re.IGNORECASE | re.DOTALL)


def final_answer(text: str) -> str | None:
    """The last <answer> (else \\boxed{}) content outside tool calls, or None."""
    text = text or ""
    for call in parse_tool_calls(text):
        text = text.replace(call.raw, " ")
    found = [a.strip() for a in _ANSWER.findall(text) if a.strip()]
    if found:
        return found[-1]
    return last_boxed(text)


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", str(s)).strip().rstrip(".").strip().casefold()


def answer_correct(pred: str, gold) -> bool:
    """Text equality after normalisation, else math equivalence (False if gold is not math)."""
    if _norm(pred) == _norm(gold):
        return True
    boxed = last_boxed(pred)
    try:
        return equivalent(gold, boxed if boxed is not None else pred)[0]
    except ValueError:
        return False


def score(prompt: str = "", completion: str = "", answer=None, **row) -> dict:
    """See the module docstring."""
    if answer is None:
        raise ValueError("tool reward needs the row field 'answer' (the gold final answer)")
    calls = parse_tool_calls(completion)
    malformed = row.get("malformed_tool_calls")
    if malformed is None:
        malformed = sum(isinstance(c, MalformedCall) for c in calls)
    pred = final_answer(completion)
    correct = pred is not None and answer_correct(pred, answer)
    penalty = float(row.get("malformed_penalty", 1.0))
    value = float(correct) * max(0.0, 1.0 - penalty * int(malformed))
    return {"score": value, "correct": int(correct), "has_answer": int(pred is not None),
            "tool_calls": len(calls), "malformed_tool_calls": int(malformed)}
