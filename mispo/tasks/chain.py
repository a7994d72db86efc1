"""``builtin:chain``: sums of several small numbers, answered with a short worked solution.

Rows: ``{"prompt": "4+7+2=", "answer": "13"}``; SFT rows add the worked completion
``"4+7=11,11+2=13\\boxed{13}"`` (one running sum per operation, then the boxed answer), which
rewards.math scores 1.0. Answers are tens of tokens under the tiny char tokenizer (~25 for three
terms), long enough that a trajectory's geometric-mean ratio averages many tokens, as in the
off-policy study (benchmarks/offpolicy.py). Options as builtin:arithmetic (mispo.tasks.arithmetic),
plus ``terms`` (operands per problem, default 3; ``-`` keeps running values >= 0 unless
``negative``); defaults ``operations="+"``, ``digits=1``. ``sft_boxed_fraction`` (default 1.0): the
share of SFT rows ending in ``\\boxed{N}``; the others end with the bare number (scored 0).
"""

from __future__ import annotations

import random
import re
from typing import Any

from .arithmetic import _OPS, ArithmeticTask


class ChainTask(ArithmeticTask):
    name = "chain"
    defaults = {**ArithmeticTask.defaults, "operations": "+", "digits": 1, "terms": 3}

    def options(self, opts: dict[str, Any]) -> dict[str, Any]:
        o = super().options(opts)
        if not (isinstance(o["terms"], int) and 2 <= o["terms"] <= 8):
            raise ValueError(f"data.builtin.terms = {o['terms']!r}: fix: use an integer from 2 to 8")
        if "/" in o["operations"]:
            raise ValueError("data.builtin.operations: builtin:chain has no '/'; fix: use + - *")
        return o

    def problem(self, rng: random.Random, o: dict[str, Any]) -> tuple[str, int]:
        value = self._operand(rng, *o["digits"])
        expr = str(value)
        for _ in range(o["terms"] - 1):
            op, b = rng.choice(o["operations"]), self._operand(rng, *o["digits"])
            if op == "-" and not o["negative"] and value < b:
                op = "+"
            expr, value = f"{expr}{op}{b}", _OPS[op](value, b)
        return expr, value

    @staticmethod
    def steps(expr: str) -> str:
        """The running sums of ``expr``, left to right: "4+7+2" -> "4+7=11,11+2=13"."""
        tokens = re.findall(r"\d+|[-+*]", expr)
        value, out = int(tokens[0]), []
        for k in range(1, len(tokens), 2):
            op, b = tokens[k], int(tokens[k + 1])
            new = _OPS[op](value, b)
            out.append(f"{value}{op}{b}={new}")
            value = new
        return ",".join(out)

    def completion(self, expr: str, value: int) -> dict:
        return {"completion": f"{self.steps(expr)}\\boxed{{{value}}}"}

    def weak_completion(self, expr: str, value: int) -> dict:
        return {"completion": f"{self.steps(expr)} {value}"}
