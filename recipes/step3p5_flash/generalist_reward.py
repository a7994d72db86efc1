"""Reward of the generalist RL stage: each row's `domain` field picks the verifiable checker.

    score(prompt=..., completion=..., domain="math", answer="42")      -> rewards.math.scorer(boxed_only=True)
    score(prompt=..., completion=..., domain="code", tests=[...])      -> rewards.code.score
"""

from __future__ import annotations

from rewards import code, math

CHECKERS = {"math": math.scorer(boxed_only=True), "code": code.score}  # math: only the last \boxed{} counts


def score(prompt: str = "", completion: str = "", domain: str = "math", **row) -> dict:
    """The row's domain checker's result (a dict with `score`); an unknown domain raises (a logged failure)."""
    checker = CHECKERS.get(domain)
    if checker is None:
        raise ValueError(f"row field domain = {domain!r} has no checker; use one of {sorted(CHECKERS)}")
    return checker(prompt=prompt, completion=completion, **row)
