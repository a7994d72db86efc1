"""The task protocol: deterministic problem generators with disjoint train / eval splits.

A task turns ``(n, seed, **opts)`` into a list of row dicts with at least ``prompt`` (str) and
``answer`` (str); ``sft_rows`` rows also carry ``completion``, a target the task's reward scores
1.0 (a warm-up appends the tokenizer's EOS itself). Same arguments, same rows, on any machine.
"""

from __future__ import annotations

from typing import Any


class Task:
    """Base class; subclasses set ``name`` and implement the three row functions."""

    name: str = ""

    def train_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        raise NotImplementedError

    def eval_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        raise NotImplementedError

    def sft_rows(self, n: int, seed: int = 0, **opts: Any) -> list[dict]:
        raise NotImplementedError
