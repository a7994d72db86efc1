"""``builtin:calculator``: arithmetic too long to do in one's head, meant for a calculator tool.

Rows: ``{"prompt": "What is 317*29?", "answer": "9193"}`` (environments.tool_env reads
``prompt`` when a row has no ``question``). SFT rows add ``"tool_call"``, the call to make
(``<tool_call name="calc"><expression>317*29</expression></tool_call>``, one of the XML shapes
environments.toolcalls accepts; the short one keeps tiny models' sequences short),
and ``"completion": "<answer>9193</answer>"``, the final turn, which rewards.tool scores 1.0.
Options as builtin:arithmetic (mispo.tasks.arithmetic), with defaults ``operations="*"``,
``digits=[2, 3]``, ``template="What is {expr}?"``. Only data: the environment is elsewhere.
"""

from __future__ import annotations

from .arithmetic import ArithmeticTask


class CalculatorTask(ArithmeticTask):
    name = "calculator"
    defaults = {**ArithmeticTask.defaults, "operations": "*", "digits": [2, 3],
                "template": "What is {expr}?"}

    def completion(self, expr: str, value: int) -> dict:
        call = f'<tool_call name="calc"><expression>{expr}</expression></tool_call>'
        return {"tool_call": call, "completion": f"<answer>{value}</answer>"}
