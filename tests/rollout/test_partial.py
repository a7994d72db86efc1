"""Partial rollouts without an engine: how segments are stitched, seeded and versioned, and which recipes
may ask for them. (On the real engine: test_rollout.py::test_partial_rollouts_continue_under_new_weights.)"""

from __future__ import annotations

import pytest

from mispo.batch import Sample
from mispo.rollout.partial import generate_partial
from mispo.loop.staleness import drop_stale

STOP = 99


class ScriptedGroup:
    """RolloutGroup.generate stand-in: request (group g) continues with tokens 10*g + position, stopping at
    position stop_at[g] with STOP; `version` is what the engines hold now. Records every call."""

    def __init__(self, stop_at: dict[int, int]):
        self.stop_at, self.version, self.calls = stop_at, 0, []

    def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
        assert n == 1
        self.calls.append({"groups": [r["group"] for r in requests], "seed": seed, "budget": max_new_tokens,
                           "continued": [len(r["continue_ids"]) for r in requests]})
        out = []
        for r in requests:
            g, done = r["group"], len(r["continue_ids"])
            ids, finish = [], "length"
            for pos in range(done, done + max_new_tokens):
                if pos == self.stop_at.get(g):
                    ids.append(STOP)
                    finish = "stop"
                    break
                ids.append(10 * g + pos)
            out.append(Sample(prompt_ids=r["prompt_ids"], response_ids=ids, rollout_logprobs=[-0.5] * len(ids),
                              loss_mask=[1] * len(ids), finish_reason=finish, group=g,
                              response_text=f"text of {r['continue_ids'] + ids}", version=self.version))
        return out


def test_segments_are_stitched_with_the_version_of_each_token():
    # request 0 (sample ids 0, 1) and request 1 (sample ids 2, 3); sample id 1 stops at position 5
    engine = ScriptedGroup(stop_at={1: 5})
    reqs = [{"prompt_ids": [1, 2], "group": 0, "row": {"a": 1}}, {"prompt_ids": [3], "group": 1}]

    def sync(segment):
        engine.version += 1  # a weight sync after every segment

    samples = generate_partial(engine, reqs, n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, segment_tokens=4,
                               seed=100, after_segment=sync)
    assert [s.group for s in samples] == [0, 0, 1, 1] and samples[0].row == {"a": 1}
    full = samples[0]
    assert full.response_ids == list(range(10)) and full.finish_reason == "length"
    assert full.token_versions == [0] * 4 + [1] * 4 + [2] * 2 and full.version == 0
    assert full.response_text == f"text of {list(range(10))}"
    stopped = samples[1]  # sample id 1: 10 * 1 + position, STOP at position 5
    assert stopped.response_ids == [10, 11, 12, 13, 14, STOP] and stopped.finish_reason == "stop"
    assert stopped.token_versions == [0] * 4 + [1] * 2
    # segment budgets: 4, 4, then the 2 left; a stopped sequence is not continued
    assert [c["budget"] for c in engine.calls] == [4, 4, 2]
    assert [c["groups"] for c in engine.calls] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 3]]
    assert [c["continued"] for c in engine.calls] == [[0] * 4, [4] * 4, [8] * 3]
    assert [c["seed"] for c in engine.calls] == [100, 104, 108]  # seed + segment * (requests x n)


def test_a_sample_is_as_old_as_its_oldest_token():
    engine = ScriptedGroup(stop_at={})
    versions = iter([3, 5])

    def sync(segment):
        engine.version = next(versions, engine.version)

    engine.version = 2
    [s] = generate_partial(engine, [{"prompt_ids": [1], "group": 0}], n=1, temperature=1.0, top_p=1.0,
                           max_new_tokens=6, segment_tokens=2, seed=None, after_segment=sync)
    assert s.token_versions == [2, 2, 3, 3, 5, 5] and s.version == 2
    kept, metrics = drop_stale([("d", [s])], learner_version=5, max_staleness=3)
    assert kept == [("d", [s])]
    assert metrics["rollout/staleness"] == 3 and metrics["rollout/partial_frac"] == 1.0
    assert metrics["rollout/token_staleness"] == pytest.approx((3 + 3 + 2 + 2 + 0 + 0) / 6)
    kept, metrics = drop_stale([("d", [s])], learner_version=6, max_staleness=3)  # its oldest token is 4 behind
    assert kept == [("d", [])] and metrics["rollout/dropped_stale"] == 1


def test_engine_context_ending_a_segment_early_finishes_the_sample():
    class ShortContext(ScriptedGroup):
        def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
            out = super().generate(requests, n, temperature, top_p, max_new_tokens, seed)
            return [Sample(**{**vars(s), "response_ids": s.response_ids[:1], "rollout_logprobs": [-0.5]})
                    if len(r["continue_ids"]) else s for r, s in zip(requests, out)]

    engine = ShortContext(stop_at={})
    [s] = generate_partial(engine, [{"prompt_ids": [1], "group": 0}], n=1, temperature=1.0, top_p=1.0,
                           max_new_tokens=12, segment_tokens=4)
    assert s.response_ids == [0, 1, 2, 3, 4] and s.finish_reason == "length" and len(engine.calls) == 2


class ContextLimit(ScriptedGroup):
    """A ScriptedGroup with vLLM's context rules: a prompt of max_model_len tokens or more is refused (no room
    for one more token), and generation stops with "length" when prompt + response fill the context."""

    def __init__(self, stop_at, max_model_len):
        super().__init__(stop_at)
        self.max_model_len = max_model_len

    def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
        for r in requests:
            length = len(r["prompt_ids"]) + len(r["continue_ids"])
            if length >= self.max_model_len:
                raise ValueError(f"The decoder prompt (length {length}) plus the number of requested output tokens "
                                 f"(at least 1) is longer than the maximum model length of {self.max_model_len}.")
        out = super().generate(requests, n, temperature, top_p, max_new_tokens, seed)
        for r, s in zip(requests, out):
            room = self.max_model_len - len(r["prompt_ids"]) - len(r["continue_ids"])
            if len(s.response_ids) > room:
                s.response_ids, s.rollout_logprobs, s.finish_reason = s.response_ids[:room], [-0.5] * room, "length"
        return out


@pytest.mark.parametrize("prompt_len", [4, 3])
def test_a_sequence_that_fills_the_context_at_a_segment_boundary_is_finished(prompt_len):
    """max_model_len 12: a 4-token prompt + two 4-token segments fill it exactly at a boundary (the second
    segment returns its whole budget, "length"); a 3-token prompt fills it inside the third segment."""
    engine = ContextLimit(stop_at={}, max_model_len=12)
    [s] = generate_partial(engine, [{"prompt_ids": [1] * prompt_len, "group": 0}], n=1, temperature=1.0, top_p=1.0,
                           max_new_tokens=20, segment_tokens=4, max_model_len=12)
    assert len(s.prompt_ids) + len(s.response_ids) == 12 and s.finish_reason == "length"
    assert s.response_ids == list(range(12 - prompt_len))
    assert len(engine.calls) == (2 if prompt_len == 4 else 3)


# --------------------------------------------------------------------------- recipe checks
BASE = {"name": "t", "trainer": {"mode": "async", "max_staleness": 2}, "rollout": {"max_new_tokens": 32,
        "partial_rollout_tokens": 8}}


def recipe(**sections):
    from mispo.config import Recipe

    data = {k: dict(v) for k, v in BASE.items() if isinstance(v, dict)}
    data["name"] = "t"
    for section, fields in sections.items():
        data.setdefault(section, {}).update(fields)
    return Recipe(**data)


def test_a_recipe_with_partial_rollouts_validates():
    assert recipe().rollout.partial_rollout_tokens == 8
    assert recipe(algorithm={"policy_loss": "tis"}).algorithm.policy_loss == "tis"


@pytest.mark.parametrize("sections, message", [
    ({"trainer": {"mode": "sync", "max_staleness": 0}}, "no effect in trainer.mode = sync"),
    ({"rollout": {"partial_rollout_tokens": 32}}, "not below rollout.max_new_tokens"),
    ({"rollout": {"environment": "env.py:Env"}}, "single-turn"),
    ({"algorithm": {"policy_loss": "grpo", "advantage": "grpo"}}, "does not correct each token"),
    ({"algorithm": {"policy_loss": "gspo"}}, "does not correct each token"),
])
def test_partial_rollouts_refused_where_they_cannot_act(sections, message):
    with pytest.raises(ValueError, match="rollout.partial_rollout_tokens") as err:
        recipe(**sections)
    assert message in str(err.value)
