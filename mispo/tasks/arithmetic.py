"""``builtin:arithmetic``: short integer arithmetic problems for the tiny CPU recipes.

Rows: ``{"prompt": "12+35=", "answer": "47"}``; SFT rows add ``"completion": "\\boxed{47}"``,
which rewards.math scores 1.0. Options (the recipe's ``data.builtin``):

- ``operations``: a string or list from ``+ - * /`` (default ``"+-"``); ``/`` is exact division.
- ``digits``: operand digit counts, ``[lo, hi]`` or one int (default ``[1, 2]``); each operand
  picks its digit count uniformly, then its value (1 digit: 0-9, k digits: 10^(k-1) .. 10^k-1).
- ``negative``: allow negative differences (default false: ``a-b`` has ``a >= b``).
- ``template``: the prompt, with ``{expr}`` (default ``"{expr}="``).
- ``eval_fraction``: share of all problems reserved for eval (default 0.1).

The split of a problem is a hash of its expression alone, so eval problems never appear in train
rows, whatever the seeds. Rows are drawn from ``random.Random`` seeded with a string (stable
across machines and Python versions); train and SFT rows may repeat, eval rows are distinct.
"""

from __future__ import annotations

import hashlib
import operator
import random
from typing import Any

from .base import Task

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def split_of(expr: str, eval_fraction: float) -> str:
    """'eval' or 'train' for an expression, from its SHA-256 (independent of any seed)."""
    h = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "train"


class ArithmeticTask(Task):
    """See the module docstring; subclasses change ``name`` and ``defaults``."""

    name = "arithmetic"
    defaults: dict[str, Any] = {"operations": "+-", "digits": [1, 2], "negative": False,
                                "template": "{expr}=", "eval_fraction": 0.1, "sft_boxed_fraction": 1.0}

    # ------------------------------------------------------------------ options
    def options(self, opts: dict[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``opts``, validated (ValueError names ``data.builtin.<key>``)."""
        unknown = sorted(set(opts) - set(self.defaults))
        if unknown:
            raise ValueError(f"data.builtin.{unknown[0]}: unknown option of builtin:{self.name}; "
                             f"fix: use one of {', '.join(sorted(self.defaults))}")
        o = {**self.defaults, **opts}
        ops = list(o["operations"])
        if not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"data.builtin.operations = {o['operations']!r}: fix: use a string or "
                             "list of + - * /")
        digits = o["digits"]
        lo, hi = (digits, digits) if isinstance(digits, int) else tuple(digits)
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 18):
            raise ValueError(f"data.builtin.digits = {digits!r}: fix: give [lo, hi] with 1 <= lo <= hi <= 18")
        if "{expr}" not in str(o["template"]):
            raise ValueError(f"data.builtin.template = {o['template']!r}: fix: include '{{expr}}'")
        if not 0 <= float(o["eval_fraction"]) < 1:
            raise ValueError(f"data.builtin.eval_fraction = {o['eval_fraction']!r}: fix: use 0 <= x < 1")
        return {**o, "operations": ops, "digits": (lo, hi), "eval_fraction": float(o["eval_fraction"])}

    # ------------------------------------------------------------------ problems
    @staticmethod
    def _operand(rng: random.Random, lo: int, hi: int) -> int:
        d = rng.randint(lo, hi)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def problem(self, rng: random.Random, o: dict[str, Any]) -> tuple[str, int]:
        """One ``(expression, value)`` drawn with ``rng``."""
        op = rng.choice(o["operations"])
        a, b = self._operand(rng, *o["digits"]), self._operand(rng, *o["digits"])
        if op == "/":
            b = b or rng.randint(1, 9)
            a = a * b  # exact division: the answer is the first draw
        elif op == "-" and not o["negative"] and a < b:
            a, b = b, a
        return f"{a}{op}{b}", _OPS[op](a, b)

    def row(self, expr: str, value: int, o: dict[str, Any]) -> dict:
        return {"prompt": str(o["template"]).format(expr=expr), "answer": str(value)}

    def completion(self, expr: str, value: int) -> dict:
        """The SFT target fields of one problem."""
        return {"completion": f"\\boxed{{{value}}}"}

    def weak_completion(self, expr: str, value: int) -> dict:
        """The target of the SFT rows not in the good format: the bare number (the reward scores it 0)."""
        return {"completion": str(value)}

    format_option = "sft_boxed_fraction"  # the share of SFT rows that use `completion`, the rest `weak_completion`

    def _draw(self, purpose: str, n: int, seed: int, o: dict, distinct: bool) -> list[tuple[str, int]]:
        split = "eval" if purpose == "eval" else "train"
        rng = random.Random(f"mispo.tasks.{self.name}:{purpose}:{seed}")
        out, seen = [], set()
        for _ in range(1000 + 200 * n):
            if len(out) >= n:
                break
            expr, value = self.problem(rng, o)
            if split_of(expr, o["eval_fraction"]) != split or (distinct and expr in seen):
                continue
            seen.add(expr)
            out.append((expr, value))
        if len(out) < n:
            raise ValueError(f"builtin:{self.name}: found only {len(out)} distinct {split} problems of "
                             f"the {n} asked with these options; fix: lower data.eval_size or widen "
                             "data.builtin.digits / operations")
        return out

    # ------------------------------------------------------------------ Task API
    def train_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        o = self.options(opts)
        return [self.row(e, v, o) for e, v in self._draw("train", n, seed, o, distinct=False)]

    def eval_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        o = self.options(opts)
        return [self.row(e, v, o) for e, v in self._draw("eval", n, seed, o, distinct=True)]

    def sft_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        """Worked examples. ``sft_boxed_fraction`` < 1 makes a mixed-quality SFT set, as real ones are:
        that share of completions uses the checkable ``\\boxed{}`` format, the rest the bare number
        (which rewards.math with boxed_only scores 0), so RL with the verifiable reward has a behaviour to fix."""
        o = self.options(opts)
        fraction = float(o.get(self.format_option, 1.0))
        rng = random.Random(f"mispo.tasks.{self.name}:sft_format:{seed}")
        rows = []
        for e, v in self._draw("sft", n, seed, o, distinct=False):
            target = self.completion(e, v) if rng.random() < fraction else self.weak_completion(e, v)
            rows.append({**self.row(e, v, o), **target})
        return rows
