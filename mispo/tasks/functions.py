"""``builtin:functions``: short Python functions from templates, each with tests, for the tiny code recipes.

Rows are HumanEval-shaped, so rewards.code scores them in the sandbox::

    {"prompt": 'def scale(x):\\n    \\"\\"\\"Return x times 3 plus 2.\\"\\"\\"\\n',
     "test": "def check(candidate):\\n    assert candidate(0) == 2\\n    ...",
     "entry_point": "scale", "task_id": "functions/scale/x*3+2", "answer": "    return x*3+2"}

SFT rows add ``"completion"``: the function body (``answer``), which rewards.code appends to the
prompt and scores 1.0. Each family below turns a few small constants into a docstring in words and
a one-line body (bodies are 10-30 characters: tens of tokens under the tiny char tokenizer).

Options (the recipe's ``data.builtin``):

- ``families``: the templates to use, a list from ``FAMILIES`` (default all).
- ``eval_fraction``: share of all problems reserved for eval (default 0.2). The split of a problem is
  a hash of its ``task_id`` alone, so eval problems never appear in train or SFT rows, whatever the seeds.
- ``sft_return_fraction``: share of SFT rows whose body ``return``s the value (default 1.0); the
  others ``print`` it, so the function returns None and the tests fail (score 0): a mixed-quality SFT
  set, as real ones are, so RL with the sandboxed reward has a behaviour to fix.

Train and SFT rows are drawn with replacement; eval rows are distinct. Same arguments, same rows.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from .arithmetic import split_of
from .base import Task

_OPS = {"plus": "+", "minus": "-"}
_INTS = [0, 1, 2, 5, 9, -4]
_STRINGS = ["", "ab", "hello", "mispo rocks", "abcdefghijkl"]
_LISTS = [[], [1], [3, -2, 7], [0, 5, 5, 10]]


def _problems_affine() -> list[tuple]:
    return [("scale", "x", f"x times {a} {w} {b}", f"x*{a}{op}{b}", _INTS)
            for a in range(2, 10) for w, op in _OPS.items() for b in range(1, 10)]


def _problems_combine() -> list[tuple]:
    return [("combine", "a, b", f"a times {a} {w} b times {b}", f"a*{a}{op}b*{b}",
             [(1, 2), (0, 0), (5, -3), (7, 4)])
            for a in range(2, 10) for w, op in _OPS.items() for b in range(2, 10)]


def _problems_clip() -> list[tuple]:
    out = []
    for a in range(10):
        for b in range(10):
            out.append(("clip", "x", f"{a} if x is more than {b}, else x", f"{a} if x>{b} else x",
                        [b - 1, b, b + 1, -5, 20]))
            out.append(("clip", "x", f"{a} if x is less than {b}, else x", f"{a} if x<{b} else x",
                        [b - 1, b, b + 1, -5, 20]))
    return out


def _problems_strings() -> list[tuple]:
    out = [("repeat", "s", f"s repeated {a} times", f"s*{a}", _STRINGS) for a in range(2, 10)]
    for a in range(1, 10):
        out.append(("head", "s", f"the first {a} characters of s", f"s[:{a}]", _STRINGS))
        out.append(("tail", "s", f"the last {a} characters of s", f"s[-{a}:]", _STRINGS))
        out.append(("drop", "s", f"s without its first {a} characters", f"s[{a}:]", _STRINGS))
    return out


def _problems_lists() -> list[tuple]:
    out = []
    for a in range(1, 10):
        out.append(("add_all", "xs", f"xs with {a} added to each item", f"[v+{a} for v in xs]", _LISTS))
        out.append(("mul_all", "xs", f"xs with each item times {a}", f"[v*{a} for v in xs]", _LISTS))
        out.append(("keep", "xs", f"the items of xs that are more than {a}", f"[v for v in xs if v>{a}]", _LISTS))
    return out


# family -> problems as (function name, parameters, docstring words, returned expression, test inputs)
FAMILIES: dict[str, Callable[[], list[tuple]]] = {
    "affine": _problems_affine, "combine": _problems_combine, "clip": _problems_clip,
    "strings": _problems_strings, "lists": _problems_lists}


def _check(params: str, expr: str, inputs: list) -> str:
    """A HumanEval ``check(candidate)`` whose expected values are the reference expression's own."""
    lines = ["def check(candidate):"]
    for args in inputs:
        args = args if isinstance(args, tuple) else (args,)
        env = dict(zip([p.strip() for p in params.split(",")], args))
        expected = eval(expr, {}, env)  # trusted: our own template, evaluated on our own inputs
        lines.append(f"    assert candidate({', '.join(map(repr, args))}) == {expected!r}")
    return "\n".join(lines) + "\n"


def make_row(name: str, params: str, words: str, expr: str, inputs: list) -> dict:
    """The row of one problem (see the module docstring)."""
    return {"prompt": f'def {name}({params}):\n    """Return {words}."""\n',
            "test": _check(params, expr, inputs), "entry_point": name,
            "task_id": f"functions/{name}/{expr}", "answer": f"    return {expr}"}


class FunctionsTask(Task):
    """See the module docstring."""

    name = "functions"
    defaults: dict[str, Any] = {"families": list(FAMILIES), "eval_fraction": 0.2, "sft_return_fraction": 1.0}

    def options(self, opts: dict[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``opts``, validated (ValueError names ``data.builtin.<key>``)."""
        unknown = sorted(set(opts) - set(self.defaults))
        if unknown:
            raise ValueError(f"data.builtin.{unknown[0]}: unknown option of builtin:{self.name}; "
                             f"fix: use one of {', '.join(sorted(self.defaults))}")
        o = {**self.defaults, **opts}
        families = [o["families"]] if isinstance(o["families"], str) else list(o["families"])
        if not families or any(f not in FAMILIES for f in families):
            raise ValueError(f"data.builtin.families = {o['families']!r}: fix: use a list from "
                             f"{', '.join(FAMILIES)}")
        for key in ("eval_fraction", "sft_return_fraction"):
            if not 0 <= float(o[key]) <= 1 or (key == "eval_fraction" and float(o[key]) == 1):
                raise ValueError(f"data.builtin.{key} = {o[key]!r}: fix: use a number in [0, 1"
                                 f"{')' if key == 'eval_fraction' else ']'}")
        return {**o, "families": families, "eval_fraction": float(o["eval_fraction"]),
                "sft_return_fraction": float(o["sft_return_fraction"])}

    def problems(self, split: str, o: dict[str, Any]) -> list[dict]:
        """Every problem of ``split`` ('train' or 'eval') under options ``o``, in a fixed order."""
        rows = [make_row(*p) for f in o["families"] for p in FAMILIES[f]()]
        return [r for r in rows if split_of(r["task_id"], o["eval_fraction"]) == split]

    def _pool(self, purpose: str, n: int, o: dict[str, Any]) -> list[dict]:
        split = "eval" if purpose == "eval" else "train"
        pool = self.problems(split, o)
        if not pool or (split == "eval" and len(pool) < n):
            raise ValueError(f"builtin:{self.name}: only {len(pool)} {split} problems with these options, "
                             f"{n} asked; fix: lower data.eval_size or use more data.builtin.families")
        return pool

    # ------------------------------------------------------------------ Task API
    def train_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        pool = self._pool("train", n, self.options(opts))
        rng = random.Random(f"mispo.tasks.{self.name}:train:{seed}")
        return [dict(rng.choice(pool)) for _ in range(n)]

    def eval_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        pool = self._pool("eval", n, self.options(opts))
        random.Random(f"mispo.tasks.{self.name}:eval:{seed}").shuffle(pool)
        return pool[:n]

    def sft_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        """Worked examples: ``completion`` is the body; with ``sft_return_fraction`` < 1 the rest of the
        bodies ``print`` the value instead of returning it (rewards.code scores those 0)."""
        o = self.options(opts)
        pool = self._pool("sft", n, o)
        rng = random.Random(f"mispo.tasks.{self.name}:sft:{seed}")
        fmt = random.Random(f"mispo.tasks.{self.name}:sft_format:{seed}")
        rows = []
        for _ in range(n):
            row = dict(rng.choice(pool))
            good = fmt.random() < o["sft_return_fraction"]
            rows.append({**row, "completion": row["answer"] if good else self.weak_completion(row)})
        return rows

    @staticmethod
    def weak_completion(row: dict) -> str:
        """The body that prints the value instead of returning it."""
        return "    print(" + row["answer"].removeprefix("    return ") + ")"
