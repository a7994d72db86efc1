"""The token-level episode driver, with a scripted generator in place of vLLM."""

from mispo.rollout.environment import StepResult
from mispo.rollout.episode_loop import run_episode
from environments.tool_env import ToolEnv


def encode(text):
    """Toy tokenizer: one id per character (offset so ids are recognisable)."""
    return [1000 + ord(c) for c in text]


def scripted(turns):
    """A generate_turn that plays back (text, finish_reason) turns with fake ids/logprobs."""
    calls = []

    def generate_turn(token_ids):
        calls.append(list(token_ids))
        text, reason = turns[len(calls) - 1]
        ids = [5000 + i for i in range(len(text))]
        return ids, text, reason, [-0.5] * len(ids)

    generate_turn.calls = calls
    return generate_turn


def test_tool_episode_masks_and_alignment():
    turn1 = "<tool_call><name>calc</name><arguments>6*7</arguments></tool_call>"
    turn2 = "<answer>42</answer>"
    gen = scripted([(turn1, "stop"), (turn2, "stop")])
    ep = run_episode(ToolEnv(), {"question": "6*7?", "answer": "42"}, gen, encode,
                     wrap_observation=lambda s: "\n" + s + "\n")
    assert ep.finish_reason == "stop" and ep.reward == 1.0 and ep.turns == 2
    assert len(ep.token_ids) == len(ep.loss_mask) == len(ep.logprobs)
    obs = encode('\n<tool_response name="calc">\n42\n</tool_response>\n')
    n1, n2 = len(turn1), len(turn2)
    assert ep.loss_mask == [0] * ep.prompt_len + [1] * n1 + [0] * len(obs) + [1] * n2
    assert ep.token_ids[ep.prompt_len + n1: ep.prompt_len + n1 + len(obs)] == obs
    # Model tokens are kept exactly as sampled, never re-tokenized.
    assert ep.token_ids[ep.prompt_len: ep.prompt_len + n1] == [5000 + i for i in range(n1)]
    assert all(lp == -0.5 for lp, m in zip(ep.logprobs, ep.loss_mask) if m == 1)
    assert all(lp is None for lp, m in zip(ep.logprobs, ep.loss_mask) if m == 0)
    # The second turn saw the whole history, observation included.
    assert gen.calls[1] == ep.token_ids[: ep.prompt_len + n1 + len(obs)]


class Echo:
    """Never finishes on its own: answers every turn with a fixed observation."""

    def reset(self, row):
        return "P"

    def step(self, text, token_ids):
        return StepResult(observation="obs")


def test_max_turns_and_unfinished_reward():
    gen = scripted([("a", "stop")] * 5)
    ep = run_episode(Echo(), {}, gen, encode, max_turns=3)
    assert ep.finish_reason == "max_turns" and ep.turns == 3 and ep.reward == 0.0

    class Scored(Echo):
        def unfinished_reward(self, reason):
            return -1.0 if reason == "max_turns" else -2.0

    assert run_episode(Scored(), {}, scripted([("a", "stop")] * 5), encode, max_turns=2).reward == -1.0


def test_token_budget_cuts_model_and_observations():
    # The model is cut off by the engine: finish "length".
    ep = run_episode(Echo(), {}, scripted([("abc", "length")]), encode, max_tokens=100)
    assert ep.finish_reason == "length" and ep.turns == 1 and ep.response_len == 3
    # An observation that would overflow the budget is not appended.
    ep = run_episode(Echo(), {}, scripted([("abcd", "stop")] * 3), encode, max_tokens=6)
    assert ep.finish_reason == "length" and ep.response_len == 4 and sum(ep.loss_mask) == 4
    # A generator that ignores the budget is truncated to it.
    ep = run_episode(Echo(), {}, scripted([("x" * 50, "stop")]), encode, max_tokens=10)
    assert ep.finish_reason == "length" and ep.response_len == 10


def test_budget_is_passed_when_accepted_and_prompt_ids_override():
    seen = []

    def gen(token_ids, max_new_tokens):
        seen.append(max_new_tokens)
        return [7], "<answer>1</answer>", "stop"   # no logprobs: zeros

    ep = run_episode(ToolEnv(tools={}), {"question": "q", "answer": "1"}, gen, encode,
                     max_tokens=50, prompt_ids=[1, 2, 3])
    assert seen == [50] and ep.prompt_len == 3 and ep.token_ids == [1, 2, 3, 7]
    assert ep.logprobs == [None, None, None, 0.0] and ep.reward == 1.0


def test_turn_cap_ignores_observations_and_context_bounds_the_sequence():
    seen = []

    def gen(token_ids, budget):
        seen.append(budget)
        return [7] * min(budget, 4), "abcd"[:budget], "stop" if budget >= 4 else "length"

    obs = len(encode("obs"))
    # the per-turn cap is the same every turn; the episode budget (model + observations) is what shrinks
    ep = run_episode(Echo(), {}, gen, encode, max_turns=3, max_turn_tokens=5, max_tokens=100)
    assert seen == [5, 5, 5] and ep.finish_reason == "max_turns" and sum(ep.loss_mask) == 12
    seen.clear()
    ep = run_episode(Echo(), {}, gen, encode, max_turns=3, max_turn_tokens=5, max_tokens=4 + obs + 2)
    assert seen == [5, 2] and ep.finish_reason == "length" and ep.response_len == 4 + obs + 2
    # the context counts the prompt too: here it leaves room for one turn and no observation
    seen.clear()
    context = len(encode("P")) + 4 + obs - 1
    ep = run_episode(Echo(), {}, gen, encode, max_turns=3, max_turn_tokens=5, max_context=context)
    assert seen == [5] and ep.finish_reason == "length" and ep.response_len == 4
