"""Episodes played by agent code mispo did not write, through the run's OpenAI-compatible endpoint.

    rollout.environment: environments/openai_agent_example.py:agent
    rollout.environment_kind: openai_agent

An agent is a function `agent(base_url, model, prompt, row) -> reward` (`row` only if it takes it; the
reward a number, or a mapping with "reward" and info) that talks to the model with the `openai` client:
`OpenAI(base_url=base_url, api_key="...").chat.completions.create(model=model, messages=[...])`. Each
episode runs in its own thread with its own base_url (`ChatServer`, one per run); every call of every
running episode waits in a `TurnBatcher` (episodes.py) and the pending ones go to the rollout engines
together, `rollout.generate` once per distinct turn budget, at the run's sampling settings and weights.

Recording and stitching: the episode records each call's prompt ids (as the server built them: a call
that continues the last one starts with its exact ids), sampled ids, log-probs, weight version and
messages (`Call`). `stitch` makes one Sample of them: the first call's prompt is the sample's prompt;
while a call's prompt extends the sequence so far (previous prompt + completion), its new tokens (tool /
user messages, template glue) join with loss mask 0 and log-prob 0.0, its completion with loss mask 1
and the engine's log-probs. The first call whose prompt does not extend it (the agent rewrote history,
or the template re-renders it differently) ends the sample: the longest consistent prefix is trained,
the rest is counted (`reward_info["dropped_calls"]`, metric `rollout/agent_dropped_calls`).
`Sample.version` is the oldest call's version (turns are separate engine calls, so a weight sync may
land between them).

Budgets (as for environments): `max_new_tokens` per call (a request's own limit can only lower it),
`max_episode_tokens` for every token after the first prompt, the context `max_context`, and `max_turns`
calls per episode. A call past a budget is answered 400 (context_length_exceeded / max_turns) and the
episode is cut: finish_reason "length", reward 0 if the agent then raises. Any other exception of an
agent stops the rollout with its error. Seeds: call t of episode j of a request with group g uses
`seed + (g * n + j) * max_turns + t`, as environment turns do.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

from mispo.batch import Sample
from mispo.rollout.episodes import TurnBatcher
from mispo.rollout.openai_server import ApiError, Call, ChatServer, Completion


@dataclass
class Stitched:
    """An episode's sample: response-aligned loss mask and log-probs (0.0 off the sampled tokens)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    calls: int  # calls in the sample
    dropped: int  # calls after the first that did not extend the sequence


def stitch(calls: list[Call]) -> Stitched:
    """The longest consistent prefix of an episode's calls as one trajectory (module docstring)."""
    if not calls:
        raise ValueError("stitch needs at least one call")
    seq = list(calls[0].prompt_ids)
    prompt_len = len(seq)
    mask, logps = [], []
    used = 0
    for call in calls:
        if call.prompt_ids[:len(seq)] != seq:
            break
        glue = call.prompt_ids[len(seq):]
        seq += glue + call.completion.token_ids
        mask += [0] * len(glue) + [1] * len(call.completion.token_ids)
        logps += [0.0] * len(glue) + [float(x) for x in call.completion.logprobs]
        used += 1
    return Stitched(seq[:prompt_len], seq[prompt_len:], mask, logps, used, len(calls) - used)


class AgentEpisode:
    """One episode's endpoint: budgets, the batched turn, the record (`calls`); `ChatServer` calls `complete`."""

    def __init__(self, index: int, batcher: TurnBatcher, seed: int | None, max_turns: int, max_new_tokens: int,
                 max_episode_tokens: int, max_context: int):
        self.index, self.batcher, self.seed = index, batcher, seed
        self.max_turns, self.max_new_tokens = max_turns, max_new_tokens
        self.max_episode_tokens, self.max_context = max_episode_tokens, max_context
        self.calls: list[Call] = []
        self.cut: str | None = None  # "length" / "max_turns" once a budget refused a call
        self._busy = threading.Lock()

    def complete(self, prompt_ids: list[int], max_tokens: int | None, messages: list[dict]) -> Completion:
        if not self._busy.acquire(blocking=False):
            raise ApiError(400, "this episode already has a chat-completions call in flight; an episode is one "
                                "trajectory: make its calls one after another")
        try:
            return self._complete(prompt_ids, max_tokens, messages)
        finally:
            self._busy.release()

    def _complete(self, prompt_ids: list[int], max_tokens: int | None, messages: list[dict]) -> Completion:
        turn = len(self.calls)
        if turn >= self.max_turns:
            self.cut = "max_turns"
            raise ApiError(400, f"this episode has made its rollout.max_turns = {self.max_turns} calls",
                           code="max_turns")
        start = len(self.calls[0].prompt_ids) if self.calls else len(prompt_ids)
        room = min(self.max_new_tokens, self.max_context - len(prompt_ids),
                   self.max_episode_tokens - (len(prompt_ids) - start))
        if room <= 0:
            self.cut = "length"
            raise ApiError(400, f"the episode's token budget is spent: the prompt has {len(prompt_ids)} tokens "
                                f"({len(prompt_ids) - start} after the first prompt, rollout.max_episode_tokens = "
                                f"{self.max_episode_tokens}; context {self.max_context})", param="messages",
                           code="context_length_exceeded")
        if max_tokens is not None:
            if max_tokens < 1:
                raise ApiError(400, f"max_completion_tokens = {max_tokens} must be at least 1",
                               param="max_completion_tokens")
            room = min(room, max_tokens)
        seed = None if self.seed is None else self.seed + turn
        out = self.batcher.turn(self.index, list(prompt_ids), room, seed)
        self.calls.append(Call(list(prompt_ids), out, messages))
        return out


def batched_generate(rollout, temperature: float, top_p: float) -> Callable[[dict], dict]:
    """TurnBatcher's generate over `rollout.generate` (a RolloutGroup or RolloutWorker):
    {episode: (ids, budget, seed)} -> {episode: Completion}, one engine call per distinct budget."""

    def generate_turns(turns: dict) -> dict:
        by_budget: dict[int, list] = {}
        for k, (_, budget, _) in turns.items():
            by_budget.setdefault(budget, []).append(k)
        out = {}
        for budget, keys in by_budget.items():
            seeded = all(turns[k][2] is not None for k in keys)
            # with n = 1 the engine seeds request r with seed + r["group"]: group carries the call's seed
            requests = [{"prompt_ids": turns[k][0], "group": turns[k][2] if seeded else 0} for k in keys]
            samples = rollout.generate(requests, n=1, temperature=temperature, top_p=top_p, max_new_tokens=budget,
                                       seed=0 if seeded else None)
            for k, s in zip(keys, samples):
                out[k] = Completion(list(s.response_ids), s.response_text, s.finish_reason,
                                    list(s.rollout_logprobs), s.version)
        return out

    return generate_turns


def call_agent(agent: Callable, base_url: str, model: str, prompt: Any, row: dict) -> tuple[float, dict]:
    """Run the agent; its result as (reward, info)."""
    params = inspect.signature(agent).parameters
    takes_row = "row" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    result = agent(base_url=base_url, model=model, prompt=prompt, **({"row": row} if takes_row else {}))
    if isinstance(result, (int, float)):
        return float(result), {}
    if isinstance(result, dict) and isinstance(result.get("reward"), (int, float)):
        info = dict(result)
        return float(info.pop("reward")), info
    raise TypeError(f"rollout.environment agent {getattr(agent, '__name__', agent)!r} returned {result!r}; fix: "
                    "return the episode's reward (a number) or a dict with a numeric 'reward'")


def play_agent_episodes(rollout, server: ChatServer, agent: Callable, requests: list[dict], n: int,
                        temperature: float, top_p: float, max_new_tokens: int, max_turns: int,
                        max_episode_tokens: int | None, seed: int | None = None) -> list[Sample]:
    """n agent episodes per request, request-major, as Samples (module docstring). `Sample.reward` is the
    agent's; `reward_info` its info plus {"source": "openai_agent", "calls", "stitched_calls",
    "dropped_calls", "episode_finish"}."""
    jobs = [(req, j) for req in requests for j in range(n)]
    batcher = TurnBatcher(len(jobs), batched_generate(rollout, temperature, top_p))
    budget = server.max_context if max_episode_tokens is None else max_episode_tokens
    episodes = [AgentEpisode(k, batcher, None if seed is None else seed + (req.get("group", 0) * n + j) * max_turns,
                             max_turns, max_new_tokens, budget, server.max_context)
                for k, (req, j) in enumerate(jobs)]
    results: list[tuple[float, dict] | None] = [None] * len(jobs)

    def play(k: int) -> None:
        row = jobs[k][0].get("row", {})
        episode_id = server.open(episodes[k])
        try:
            results[k] = call_agent(agent, server.base_url(episode_id), server.model_name,
                                    row.get("prompt", jobs[k][0].get("prompt_text", "")), row)
        except Exception:
            if episodes[k].cut is None:
                raise
            results[k] = (0.0, {})  # it failed on the budget's 400: a cut episode
        finally:
            server.close(episode_id)
        if not episodes[k].calls:
            raise RuntimeError(f"rollout.environment agent {getattr(agent, '__name__', agent)!r} returned without "
                               "calling the model; fix: make at least one chat.completions.create call at the "
                               "base_url it is given")

    batcher.run([lambda k=k: play(k) for k in range(len(jobs))])
    return [_sample(req, ep, *res, server.tokenizer) for (req, _), ep, res in zip(jobs, episodes, results)]


def _sample(req: dict, ep: AgentEpisode, reward: float, info: dict, tokenizer) -> Sample:
    s = stitch(ep.calls)
    kept = ep.calls[:s.calls]
    cut = ep.cut or ("length" if ep.calls[-1].completion.finish_reason == "length" else None)
    info = dict(info, source="openai_agent", calls=len(ep.calls), stitched_calls=s.calls, dropped_calls=s.dropped,
                episode_finish=cut or "stop")
    return Sample(prompt_ids=s.prompt_ids, response_ids=s.response_ids, rollout_logprobs=s.logprobs,
                  loss_mask=s.loss_mask, finish_reason="length" if cut else "stop", group=req.get("group", 0),
                  row=req.get("row", {}), prompt_text=tokenizer.decode(s.prompt_ids),
                  response_text="".join(c.completion.text for c in kept),
                  version=min(c.completion.version for c in kept), reward=reward, reward_info=info)


def serve_agents(domains: list, tokenizer, max_context: int) -> ChatServer | None:
    """Start the run's endpoint and give it to every `openai_agent` domain; None when there is none."""
    agents = [d for d in domains if d.recipe.rollout.environment_kind == "openai_agent"]
    if not agents:
        return None
    server = ChatServer(tokenizer, max_context)
    for d in agents:
        d.agent_server = server
    return server
