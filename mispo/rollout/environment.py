"""The multi-turn episode protocol between a rollout loop and an environment.

One environment object runs one episode at a time:

1. ``prompt = env.reset(row)``: start from a dataset row; returns the prompt text.
2. Repeat: the model writes a turn; ``result = env.step(text, token_ids)`` with the turn's text
   and the exact token ids sampled. The environment either continues with ``result.observation``
   (e.g. tool results: text the loop tokenizes and appends with loss mask 0) or ends the episode
   with ``result.done = True`` and ``result.reward``.

The environment never returns or re-tokenizes the model's own text: the loop keeps the sampled
token ids as they are and only tokenizes what the environment adds. ``token_ids`` are passed for
environments that want them (e.g. counting tokens); most use only ``text``.
An optional ``unfinished_reward(reason) -> float`` scores episodes the loop cut off
(``"length"`` or ``"max_turns"``); without it they score 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


@dataclass
class StepResult:
    """What the environment answers to one model turn."""

    observation: str = ""
    done: bool = False
    reward: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def finish(cls, reward: float, **info) -> "StepResult":
        return cls(observation="", done=True, reward=float(reward), info=info)


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: Mapping[str, Any]) -> str: ...

    def step(self, text: str, token_ids: Sequence[int]) -> StepResult: ...
