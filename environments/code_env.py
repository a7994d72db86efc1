"""Code environment: run the model's program against the row's tests, feed failures back.

Row fields as for rewards.code (HumanEval ``prompt``/``test``/``entry_point`` or stdin/stdout
``tests``). Each turn's last ```python block is tested in the sandbox. The episode ends when all
tests pass or after ``max_attempts`` turns; the reward is the last attempt's fraction passed.
Otherwise the observation lists the failures (test line, exception, expected vs got).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mispo.rollout.environment import StepResult
from rewards.code import evaluate, extract_program

INSTRUCTIONS = ("\n\nAnswer with a complete Python solution in a ```python code block. "
                "You will see the test failures and may try again.")


class CodeEnv:
    """See the module docstring."""

    def __init__(self, max_attempts: int = 3, instructions: str = INSTRUCTIONS,
                 max_feedback: int = 3):
        self.max_attempts = max_attempts
        self.instructions = instructions
        self.max_feedback = max_feedback

    def reset(self, row: Mapping[str, Any]) -> str:
        if "prompt" not in row:
            raise ValueError("code environment needs the row field 'prompt' (the task); this row "
                             f"has: {', '.join(sorted(row))}")
        self.row = {k: v for k, v in row.items() if k != "prompt"}
        self.prompt = str(row["prompt"])
        self.attempts = 0
        return self.prompt + self.instructions

    def step(self, text: str, token_ids: Sequence[int] = ()) -> StepResult:
        self.attempts += 1
        res = evaluate(extract_program(text), self.row, prompt=self.prompt)
        if res.passed == res.total or self.attempts >= self.max_attempts:
            return StepResult.finish(res.score, passed=res.passed, total=res.total,
                                     attempts=self.attempts)
        shown = "\n".join(f"- {f}" for f in res.feedback[: self.max_feedback])
        more = len(res.feedback) - self.max_feedback
        if more > 0:
            shown += f"\n- ... and {more} more"
        return StepResult(observation=(f"Your program passed {res.passed}/{res.total} tests. "
                                       f"Failures:\n{shown}\nFix the program and answer with the "
                                       "full corrected ```python block."),
                          info={"passed": res.passed, "total": res.total})
