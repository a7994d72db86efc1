"""Multi-turn episodes for a rollout worker: environments played against batched engine turns.

    make_env = env_factory(load_object(spec, field="rollout.environment", group=ENVIRONMENT_GROUP))
    samples = play_episodes(requests, make_env, tokenizer, generate_turns, n=8, max_turns=4,
                            max_turn_tokens=256, max_episode_tokens=1024, max_context=2048, seed=0)

`generate_turns({episode: (token_ids, budget, seed)}) -> {episode: (new_ids, text, finish_reason,
logprobs)}` is one engine call for the pending turns of every running episode (RolloutWorker's).

Each episode runs `mispo.rollout.episode_loop.run_episode` in its own thread (`TurnBatcher`). The prompt is
`env.reset(row)` rendered as one user message with the tokenizer's chat template (`chat_encoder`;
plain text without one); the request's `prompt_ids`/`prompt_text` are not used, since the
environment may add to the row's prompt (tool instructions). Observations are wrapped by
`env.wrap_observation(text)` if the environment has it, else as a chat-template user turn
(`observation_wrapper`). Environment tokens have loss_mask 0 and logprob 0.0.

Budgets: `max_turn_tokens` caps each model turn; `max_episode_tokens` caps all tokens after the
prompt, model and environment together (None: only the context limits them); `max_context` caps the
whole sequence, prompt included (the engine's max_model_len).

Seeds: turn t of episode j of a request with group g uses `seed + (g * n + j) * max_turns + t`.
"""

from __future__ import annotations

import threading
from copy import deepcopy
from typing import Any, Callable

from mispo.batch import Sample


def play_episodes(requests: list[dict], make_env: Callable[[], Any], tokenizer,
                  generate_turns: Callable[[dict], dict], n: int, max_turns: int, max_turn_tokens: int,
                  max_episode_tokens: int | None, max_context: int, seed: int | None = None,
                  version: int = 0) -> list[Sample]:
    """n episodes per request, request-major, as Samples.

    `Sample.reward` is the environment's episode reward and `reward_info` holds its info plus
    {"source": "environment", "turns", "episode_finish"}. finish_reason is "stop" when the
    environment ended the episode and "length" when it was cut (a budget, the context or max_turns;
    see episode_finish)."""
    from mispo.rollout.episode_loop import run_episode

    default_wrap = observation_wrapper(tokenizer)
    jobs = [(req, j) for req in requests for j in range(n)]
    batcher = TurnBatcher(len(jobs), generate_turns)
    episodes: list[Any] = [None] * len(jobs)
    episode_tokens = max_context if max_episode_tokens is None else max_episode_tokens

    def play(k: int, req: dict, j: int) -> None:
        env = make_env()
        base = None if seed is None else seed + (req.get("group", 0) * n + j) * max_turns
        turn = [0]

        def generate_turn(ids, budget):
            out = batcher.turn(k, ids, budget, None if base is None else base + turn[0])
            turn[0] += 1
            return out

        episodes[k] = run_episode(env, req.get("row", {}), generate_turn, chat_encoder(tokenizer),
                                  max_turns=max_turns, max_turn_tokens=max_turn_tokens, max_tokens=episode_tokens,
                                  max_context=max_context,
                                  wrap_observation=getattr(env, "wrap_observation", default_wrap))

    batcher.run([lambda k=k, req=req, j=j: play(k, req, j) for k, (req, j) in enumerate(jobs)])
    samples = []
    for (req, _), ep in zip(jobs, episodes):
        prompt, response = ep.token_ids[:ep.prompt_len], ep.token_ids[ep.prompt_len:]
        info = dict(ep.info, source="environment", turns=ep.turns, episode_finish=ep.finish_reason)
        samples.append(Sample(
            prompt_ids=prompt, response_ids=response,
            rollout_logprobs=[0.0 if lp is None else lp for lp in ep.logprobs[ep.prompt_len:]],
            loss_mask=ep.loss_mask[ep.prompt_len:],
            finish_reason="stop" if ep.finish_reason == "stop" else "length",  # max_turns is a cut too
            group=req.get("group", 0), row=req.get("row", {}),
            prompt_text=tokenizer.decode(prompt),
            response_text=tokenizer.decode(response, skip_special_tokens=True),
            version=version, reward=ep.reward, reward_info=info))
    return samples


def chat_encoder(tokenizer) -> Callable[[str], list[int]]:
    """encode() for run_episode: the first call (the prompt) goes through the chat template as one
    user message; later calls (observations, already wrapped) are tokenised without special tokens."""
    state = {"first": True}

    def encode(text: str) -> list[int]:
        if state.pop("first", False):
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=False)
                return list(tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(tokenizer(text)["input_ids"])
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode


def observation_wrapper(tokenizer) -> Callable[[str], str]:
    """An observation as a user turn of the chat template, followed by the assistant prompt (the
    text as is without a template). The model's turn before it already ends with its stop token."""
    before, after = "", ""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00OBS\x00"
        head = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        base = tokenizer.apply_chat_template(head, tokenize=False)
        full = tokenizer.apply_chat_template(head + [{"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
        if full.startswith(base) and marker in full:
            before, after = full[len(base):].split(marker)
    return lambda text: before + text + after


def env_factory(obj: Any) -> Callable[[], Any]:
    """One fresh environment per episode: call a class/factory, deep-copy an instance."""
    if hasattr(obj, "reset") and hasattr(obj, "step") and not isinstance(obj, type):
        return lambda: deepcopy(obj)
    if callable(obj):
        return obj
    raise TypeError(f"rollout.environment: {obj!r} is not an environment class, factory or instance; fix: "
                    "point it at a class with reset(row) and step(text, token_ids)")


class TurnBatcher:
    """Runs one thread per episode; each turn, once every running episode waits for the model (or
    has ended), their pending turns are generated together by `generate(turns)` in this thread."""

    def __init__(self, num_episodes: int, generate: Callable[[dict], dict]):
        self.running, self.generate = num_episodes, generate
        self.pending: dict[int, tuple] = {}
        self.results: dict[int, tuple] = {}
        self.errors: list[BaseException] = []
        self.cv = threading.Condition()

    def turn(self, k: int, ids: list[int], budget: int, seed: int | None) -> tuple:
        """Called from episode k's thread: blocks until its turn has been generated."""
        with self.cv:
            self.pending[k] = (ids, budget, seed)
            self.cv.notify_all()
            self.cv.wait_for(lambda: k in self.results or self.errors)
            if k not in self.results:
                raise RuntimeError("generation failed") from self.errors[0]
            return self.results.pop(k)

    def run(self, episodes: list[Callable[[], None]]) -> None:
        """Run every episode to its end; the first error (an episode's or generate's) is re-raised here."""
        def guarded(fn):
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                with self.cv:
                    self.errors.append(exc)
            finally:
                with self.cv:
                    self.running -= 1
                    self.cv.notify_all()

        threads = [threading.Thread(target=guarded, args=(fn,), daemon=True) for fn in episodes]
        for t in threads:
            t.start()
        while True:
            with self.cv:
                self.cv.wait_for(lambda: not self.running or len(self.pending) == self.running or self.errors)
                if self.running == 0 or self.errors:
                    break
                turns, self.pending = self.pending, {}
            try:
                out = self.generate(turns)
            except BaseException as exc:  # noqa: BLE001
                out = {}
                with self.cv:
                    self.errors.append(exc)
            with self.cv:
                self.results.update(out)
                self.cv.notify_all()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
