"""Drive one multi-turn episode at the token level, keeping sampled tokens exactly as sampled.

``run_episode(env, row, generate_turn, encode)`` alternates model turns and environment steps:

- ``generate_turn(token_ids)`` (or ``generate_turn(token_ids, max_new_tokens)`` if it takes two
  parameters) returns ``(new_token_ids, text, finish_reason)`` or, with the sampling policy's
  per-token log-probs, ``(new_token_ids, text, finish_reason, logprobs)``;
  ``finish_reason`` is ``"stop"`` or ``"length"`` as vLLM reports it.
- ``encode(text) -> list[int]`` tokenizes the prompt (unless ``prompt_ids`` is given) and the
  environment's observations, after ``wrap_observation`` (e.g. chat-template markers around a
  tool response). The model's own text is never re-tokenized.

The result aligns, position by position: ``token_ids``; ``loss_mask`` (1 for model tokens, 0 for
prompt and environment tokens); ``logprobs`` (sampled log-prob for model tokens, None elsewhere,
0.0 for model tokens if the generator gave none). ``finish_reason`` is ``"stop"`` (the environment
ended the episode), ``"length"`` (a budget ran out: the model was cut off, or an observation would
not fit) or ``"max_turns"``. Unfinished episodes get
``env.unfinished_reward(reason)`` if the environment has it, else 0; the trainer can bootstrap
them from the value since ``finish_reason`` says they were cut.

Budgets: ``max_tokens`` caps everything after the prompt, all model turns and observations
together; ``max_turn_tokens`` caps one model turn (environment tokens never count against it) and
``max_context`` the whole sequence, prompt included (the engine's context length); None = no such
cap. A turn's budget is the smallest room left under them; a model turn cut by it (``"length"``)
ends the episode, and so does an observation that would not fit under ``max_tokens`` / ``max_context``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from mispo.rollout.environment import Environment


@dataclass
class Episode:
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float | None]
    prompt_len: int
    finish_reason: str
    reward: float
    turns: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def response_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


def _takes_budget(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL
                                   for p in inspect.signature(fn).parameters.values())


def run_episode(env: Environment, row: Mapping[str, Any], generate_turn: Callable,
                encode: Callable[[str], Sequence[int]], *, max_turns: int = 8,
                max_tokens: int = 4096, max_turn_tokens: int | None = None, max_context: int | None = None,
                prompt_ids: Sequence[int] | None = None,
                wrap_observation: Callable[[str], str] = lambda s: s) -> Episode:
    """Run ``env`` on ``row`` to the end or a budget (``max_turn_tokens`` per model turn,
    ``max_tokens`` for model and environment tokens after the prompt, ``max_context`` for the whole
    sequence). See the module docstring."""
    prompt = env.reset(row)
    ids = list(prompt_ids) if prompt_ids is not None else list(encode(prompt))
    prompt_len = len(ids)
    mask = [0] * prompt_len
    logps: list[float | None] = [None] * prompt_len
    budget_arg = _takes_budget(generate_turn)
    finish, reward, info, turns = "max_turns", None, {}, 0

    def room() -> int:
        """Tokens that may still follow `ids` under the episode budget and the context."""
        left = max_tokens - (len(ids) - prompt_len)
        return left if max_context is None else min(left, max_context - len(ids))

    while turns < max_turns:
        budget = room() if max_turn_tokens is None else min(room(), max_turn_tokens)
        if budget <= 0:
            finish = "length"
            break
        out = generate_turn(list(ids), budget) if budget_arg else generate_turn(list(ids))
        new_ids, text, reason = list(out[0]), out[1], out[2]
        lp = list(out[3]) if len(out) > 3 and out[3] is not None else [0.0] * len(new_ids)
        if len(lp) != len(new_ids):
            raise ValueError(f"generate_turn returned {len(new_ids)} tokens but {len(lp)} logprobs")
        if len(new_ids) > budget:  # a generator that ignores the budget: cut it here
            new_ids, lp, reason = new_ids[:budget], lp[:budget], "length"
        turns += 1
        ids += new_ids
        mask += [1] * len(new_ids)
        logps += [float(x) for x in lp]
        if reason == "length":
            finish = "length"
            break
        result = env.step(text, new_ids)
        info = dict(result.info)
        if result.done:
            finish, reward = "stop", result.reward
            break
        obs = list(encode(wrap_observation(result.observation)))
        if len(obs) > room():
            finish = "length"
            break
        ids += obs
        mask += [0] * len(obs)
        logps += [None] * len(obs)
    if reward is None:
        scorer = getattr(env, "unfinished_reward", None)
        reward = float(scorer(finish)) if scorer else 0.0
    return Episode(ids, mask, logps, prompt_len, finish, float(reward), turns, info)
