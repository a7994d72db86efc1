"""``builtin:calculator``: arithmetic too long to do in one's head, meant for a calculator tool.

Rows: ``{"prompt": "What is 317*29?", "answer": "9193"}`` (environments.tool_env reads
``prompt`` when a row has no ``question``). SFT rows add ``"tool_call"``, the call to make
(``<tool_call name="calc"><expression>317*29</expression></tool_call>``, one of the XML shapes
rewards.toolcalls accepts; the short one keeps tiny models' sequences short),
and ``"completion": "<answer>9193</answer>"``, the final turn, which rewards.tool scores 1.0.
Options as builtin:arithmetic (mispo.tasks.arithmetic), with defaults ``operations="*"``,
``digits=[2, 3]``, ``template="What is {expr}?"``, and ``sft_answer_fraction`` (default 1.0) in place
of ``sft_boxed_fraction``: the share of worked episodes whose final turn is ``<answer>N</answer>``; the
others end with the bare number, which rewards.tool scores 0 (a mixed-quality SFT set: every episode
calls the tool, and RL with the verifiable reward has a format to fix). Only data: the environment is
elsewhere.
"""

from __future__ import annotations

from .arithmetic import ArithmeticTask


class CalculatorTask(ArithmeticTask):
    name = "calculator"
    defaults = {**{k: v for k, v in ArithmeticTask.defaults.items() if k != "sft_boxed_fraction"},
                "operations": "*", "digits": [2, 3], "template": "What is {expr}?", "sft_answer_fraction": 1.0}
    format_option = "sft_answer_fraction"

    def completion(self, expr: str, value: int) -> dict:
        call = f'<tool_call name="calc"><expression>{expr}</expression></tool_call>'
        return {"tool_call": call, "completion": f"<answer>{value}</answer>"}

    def weak_completion(self, expr: str, value: int) -> dict:
        """The same call, then the bare number as the final turn (rewards.tool finds no answer: 0)."""
        return {**self.completion(expr, value), "completion": str(value)}
