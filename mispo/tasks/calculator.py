"""``builtin:calculator``: arithmetic too long to do in one's head, meant for a calculator tool.

Rows: ``{"prompt": "What is 317*29?", "answer": "9193"}`` (environments.tool_env reads
``prompt`` when a row has no ``question``). SFT rows add ``"tool_call"``, the call to make
(``<tool_call name="calc"><expression>317*29</expression></tool_call>``, one of the XML shapes
environments.toolcalls accepts; the short one keeps tiny models' sequences short),
and ``"completion": "<answer>9193</answer>"``, the final turn, which rewards.tool scores 1.0.
Options as builtin:arithmetic (mispo.tasks.arithmetic), with defaults ``operations="*"``,
``digits=[2, 3]``, ``template="What is {expr}?"``, and ``sft_tool_fraction`` (default 1.0) in place of
``sft_boxed_fraction``: the share of SFT rows that use the tool; the others answer at once, which a
small model can only imitate by guessing products, so RL has a behaviour to fix (call the tool).
Only data: the environment is elsewhere.
"""

from __future__ import annotations

from .arithmetic import ArithmeticTask


class CalculatorTask(ArithmeticTask):
    name = "calculator"
    defaults = {**{k: v for k, v in ArithmeticTask.defaults.items() if k != "sft_boxed_fraction"},
                "operations": "*", "digits": [2, 3], "template": "What is {expr}?", "sft_tool_fraction": 1.0}
    format_option = "sft_tool_fraction"

    def completion(self, expr: str, value: int) -> dict:
        call = f'<tool_call name="calc"><expression>{expr}</expression></tool_call>'
        return {"tool_call": call, "completion": f"<answer>{value}</answer>"}

    def weak_completion(self, expr: str, value: int) -> dict:
        """Answering at once, without the tool: right in the data, but a model that imitates it must
        multiply in its head (and mostly fails on problems it has not memorised)."""
        return {"completion": f"<answer>{value}</answer>"}
