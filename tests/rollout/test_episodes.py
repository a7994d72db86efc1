"""Multi-turn episodes without an engine (mispo.rollout.episodes): turn batching, and the two budgets,
per model turn (`max_new_tokens`) and per episode (`max_episode_tokens`), with a fake engine."""

from __future__ import annotations

import threading

import pytest

from mispo.rollout.environment import StepResult
from mispo.rollout.episodes import TurnBatcher, env_factory, observation_wrapper, play_episodes

OBSERVATION = "x" * 40  # a long tool response


class LongTool:
    """Answers each model turn with OBSERVATION; ends the episode after 3 model turns, reward 1.0."""

    def reset(self, row):
        self.turns = 0
        return "q"

    def step(self, text, token_ids):
        self.turns += 1
        return StepResult.finish(1.0) if self.turns >= 3 else StepResult(observation=OBSERVATION)


@pytest.fixture(scope="module")
def tokenizer():
    from mispo.models.step3p5.tiny import tiny_tokenizer

    return tiny_tokenizer()


def fake_engine(tokenizer, turn_len: int):
    """generate_turns that answers every turn with `turn_len` "a" tokens (cut to the budget: "length"),
    recording each call's {episode: budget}."""
    a = tokenizer.convert_tokens_to_ids("a")
    calls = []

    def generate_turns(turns):
        calls.append({k: budget for k, (_, budget, _) in turns.items()})
        out = {}
        for k, (_, budget, _) in turns.items():
            m = min(turn_len, budget)
            out[k] = ([a] * m, "a" * m, "stop" if m == turn_len else "length", [-0.5] * m)
        return out

    generate_turns.calls = calls
    return generate_turns


def play(tokenizer, engine, **budgets):
    requests = [{"row": {}, "group": 0}, {"row": {}, "group": 1}]
    return play_episodes(requests, LongTool, tokenizer, engine, n=1, max_turns=4, max_context=1024, seed=0,
                         **budgets)


def obs_len(tokenizer) -> int:
    return len(tokenizer(observation_wrapper(tokenizer)(OBSERVATION), add_special_tokens=False).input_ids)


def test_tool_output_does_not_eat_the_per_turn_cap(tokenizer):
    engine = fake_engine(tokenizer, turn_len=6)
    samples = play(tokenizer, engine, max_turn_tokens=8, max_episode_tokens=None)
    # every model turn may use the whole per-turn cap, long tool responses before it or not
    assert engine.calls == [{0: 8, 1: 8}] * 3
    for s in samples:
        assert s.finish_reason == "stop" and s.reward == 1.0 and s.reward_info["turns"] == 3
        assert sum(s.loss_mask) == 3 * 6 and len(s.response_ids) == 3 * 6 + 2 * obs_len(tokenizer)
        assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, s.loss_mask) if m == 0)


def test_episode_budget_truncates_the_episode(tokenizer):
    engine = fake_engine(tokenizer, turn_len=6)
    budget = 6 + obs_len(tokenizer) + 4  # room for one turn, one tool response and 4 more model tokens
    samples = play(tokenizer, engine, max_turn_tokens=8, max_episode_tokens=budget)
    assert engine.calls == [{0: 8, 1: 8}, {0: 4, 1: 4}]  # the second turn gets what the episode has left
    for s in samples:
        assert s.finish_reason == "length" and s.reward_info["episode_finish"] == "length"
        assert len(s.response_ids) == budget and sum(s.loss_mask) == 6 + 4

    # a tool response that does not fit the episode budget ends the episode before it
    engine = fake_engine(tokenizer, turn_len=6)
    samples = play(tokenizer, engine, max_turn_tokens=8, max_episode_tokens=6 + obs_len(tokenizer) - 1)
    assert engine.calls == [{0: 8, 1: 8}]
    assert all(s.finish_reason == "length" and s.response_ids == s.response_ids[:6] and sum(s.loss_mask) == 6
               for s in samples)


def test_context_bounds_the_episode(tokenizer):
    engine = fake_engine(tokenizer, turn_len=6)
    [s] = play_episodes([{"row": {}, "group": 0}], LongTool, tokenizer, engine, n=1, max_turns=4,
                        max_turn_tokens=8, max_episode_tokens=None, max_context=20)
    prompt = len(s.prompt_ids)
    assert engine.calls == [{0: min(8, 20 - prompt)}]  # the tool response would overflow the context
    assert s.finish_reason == "length" and prompt + len(s.response_ids) <= 20


def test_env_factory_fresh_environment_per_episode():
    instance = LongTool()
    make = env_factory(instance)
    assert make() is not instance and isinstance(make(), LongTool)
    assert env_factory(LongTool) is LongTool
    with pytest.raises(TypeError, match="rollout.environment"):
        env_factory(42)


def test_turn_batcher_batches_every_turn_and_propagates_errors():
    sizes = []

    def generate(turns):
        sizes.append(len(turns))
        return {k: ([k], "t", "stop", [0.0]) for k in turns}

    batcher = TurnBatcher(3, generate)

    def episode(k, turns):
        for _ in range(turns):
            assert batcher.turn(k, [0], 8, None)[0] == [k]

    batcher.run([lambda k=k: episode(k, k + 1) for k in range(3)])
    assert sizes == [3, 2, 1]  # one call per turn over the episodes still running

    def broken():
        raise ValueError("env bug")

    batcher = TurnBatcher(2, generate)
    before = threading.active_count()  # other tests' threads (servers, loggers) may still be alive
    with pytest.raises(ValueError, match="env bug"):
        batcher.run([lambda: episode(0, 5), broken])
    assert threading.active_count() <= before  # no episode thread left waiting
