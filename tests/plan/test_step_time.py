"""The step-time model (mispo/plan/step_time.py): its formulas against hand-computed values on a toy shape,
the calibration against NeMo-RL v0.6's published H100 throughput, and the `mispo plan` lines."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mispo.plan.step_time import (DEEPSEEK_V3, NEMO_RL_V06, QWEN3_30B_A3B, QWEN3_235B_A22B, Engines, Hardware,
                                  LearnerWork, StepTimeInputs, all_to_all_seconds, collective_seconds,
                                  compute_seconds, decode_step_seconds, experts_touched, flop_params,
                                  forward_flops, generation_seconds, learner_seconds, predict_published,
                                  shape_from_config, step_summary, train_flops)

ROOT = Path(__file__).resolve().parents[2]
FLASH_JSON = ROOT / "mispo/models/step3p5/configs/step3p5_flash.json"

TOY = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
       "intermediate_size": 16, "vocab_size": 10, "model_type": "llama"}
# round numbers: 1,000 FLOP/s peak, 100 B/s NVLink, 10 B/s InfiniBand, 1,000 B/s HBM, 8 GPUs a node
HW = Hardware(name="toy", peak_flops=1e3, hbm_bandwidth=1e3, memory_bytes=1e6, nvlink_bandwidth=100.0,
              ib_bandwidth=10.0, gpus_per_node=8)
INPUTS = StepTimeInputs(hardware=HW, train_mfu=0.5, decode_hbm_efficiency=0.5, link_efficiency=0.5,
                        nvlink_latency_s=1.0, ib_latency_s=3.0, runtime_reserve_bytes=0.0)


def test_toy_shape_flops_and_compute_time_by_hand():
    s = shape_from_config(TOY)
    # per layer: attention 8*2*4 + 2*8*1*4 + 2*4*8 = 192, MLP 3*8*16 = 384, two norms 16 -> 592
    # two layers 1,184 + embedding and lm_head 2*10*8 = 160 + final norm 8 = 1,352
    assert s.total_params == 1352 and s.active_params == 1352 and s.routed_params == 0
    assert flop_params(s) == 1352 - 80  # the input embedding is a lookup
    # 100 tokens in sequences of 10: 2 N_a + attention 2 layers x 4 nq d (10 / 2) = 2 * 160
    assert forward_flops(s, 100, 10) == 100 * (2 * 1272 + 2 * 4 * 2 * 4 * 5) == 286_400
    assert train_flops(s, 100, 10, checkpointing=False) == 3 * 286_400
    assert train_flops(s, 100, 10, checkpointing=True) == 4 * 286_400
    # 859,200 FLOPs on 2 GPUs at 1,000 x 0.5 FLOP/s each
    assert compute_seconds(3 * 286_400, 2, INPUTS) == pytest.approx(859.2)


def test_link_times_by_hand():
    # inside a node (4 <= 8 GPUs): 1,000 bytes at NVLink 100 x 0.5, plus 2 collectives x 1 s latency
    assert collective_seconds(1000, 4, INPUTS, count=2) == pytest.approx(1000 / 50 + 2)
    # across nodes (16 ranks): InfiniBand 10 x 0.5, latency 3 s
    assert collective_seconds(1000, 16, INPUTS, count=1) == pytest.approx(1000 / 5 + 3)
    assert collective_seconds(1000, 1, INPUTS) == 0
    # all-to-all over 16 ranks, 8 a node: 8 of the 15 peers are remote
    remote, local = 1000 * 8 / 15, 1000 * 7 / 15
    assert all_to_all_seconds(1000, 16, INPUTS) == pytest.approx(max(remote / 10, local / 100) / 0.5)
    assert all_to_all_seconds(1000, 8, INPUTS) == pytest.approx(1000 / 100 / 0.5)
    # overlapped collectives hide under compute; all-to-all and serial ones add
    work = LearnerWork(gpus=2, flops=2000.0, overlapped=[(100.0, 4)], all_to_all=[(1000.0, 8)], serial=[(50.0, 2)])
    t = learner_seconds(work, INPUTS)
    assert t["compute"] == pytest.approx(2.0) and t["comm_overlapped"] == pytest.approx(2.0)
    assert t["total"] == pytest.approx(2.0 + 20.0 + 1.0)
    # pipeline bubble: (pp - 1) / micro-batches more compute
    assert learner_seconds(replace(work, pipeline=4, micro_batches=6, all_to_all=[], serial=[]), INPUTS)[
        "compute"] == pytest.approx(2.0 * 1.5)


def test_decode_and_generation_by_hand():
    s = shape_from_config(TOY)
    e = Engines(count=2, tp=1, sequences=8, prompt_tokens=4, mean_response=6, max_response=10,
                memory_utilization=0.5)
    # weights 1,352 x 2 bytes; KV per token 2 layers x 2 (K, V) x 1 head x 4 x 2 bytes = 32; 4 sequences at 10 tokens
    step = decode_step_seconds(s, e, batch=4, context=10, inputs=INPUTS)
    assert step["weights"] == 2704 and step["kv"] == 4 * 10 * 32
    assert step["memory"] == pytest.approx((2704 + 1280) / (1e3 * 0.5))
    assert step["compute"] == pytest.approx(4 * (2 * 1272 + 2 * 4 * 2 * 4 * 10) / 1e3)
    assert step["tp"] == 0 and step["total"] == pytest.approx(max(step["memory"], step["compute"]))
    # generation: 4 sequences an engine; KV pool 0.5e6 - 2,704 holds them all -> steps = the longest answer, 10;
    # mean batch 4 x 6 / 10 = 2.4 at context 4 + 6 / 2 = 7; prefill 4 x 4 prompt tokens at 1,000 x 0.5
    g = generation_seconds(s, e, INPUTS)
    assert g["concurrency"] == 4 and g["decode_steps"] == 10 and g["batch"] == pytest.approx(2.4)
    d = decode_step_seconds(s, e, 2.4, 7, INPUTS)["total"]
    prefill = 16 * (2 * 1272 + 2 * 4 * 2 * 4 * 2) / 500
    assert g["prefill"] == pytest.approx(prefill) and g["seconds"] == pytest.approx(prefill + 10 * d)
    # a KV pool for one sequence at a time: 4 sequences x 6 tokens in 24 steps (waves), batch 1
    small = replace(e, memory_utilization=(2704 + 32 * 10 * 1.5) / 1e6)
    g = generation_seconds(s, small, INPUTS)
    assert g["concurrency"] == pytest.approx(1.5) and g["decode_steps"] == pytest.approx(16)
    # tensor parallel: 2 all-reduces a layer of batch x h x 2 bytes, (tp-1)/tp x 2 of it sent, latency each
    tp2 = decode_step_seconds(s, replace(e, tp=2), batch=4, context=10, inputs=INPUTS)
    assert tp2["tp"] == pytest.approx(4 * (2 * 0.5 * 4 * 8 * 2) / 50 + 4 * 1.0)


def test_moe_shape_and_experts_touched():
    moe = shape_from_config({**TOY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8})
    # per layer: router 8 x 4 + experts 4 x 3 x 8 x 8 = 768 routed; active: 2 of the 4 experts
    assert moe.routed_params == 2 * 768 and moe.active_params == moe.total_params - 768
    assert experts_touched(1, 8, 128) == pytest.approx(1 / 16)
    assert experts_touched(10_000, 8, 128) == pytest.approx(1.0)
    assert experts_touched(3, 0, 0) == 1.0


def test_step_summary_sync_and_async():
    phases = {"generation": 100.0, "logprobs": 10.0, "update": 30.0, "critic": 0.0, "refit": 5.0}
    s = step_summary(phases, tokens=1e6, gpus=10)
    assert s["step_sync"] == 145 and s["step_async"] == 105 and s["step"] == 145
    assert s["tokens_per_s_per_gpu"] == pytest.approx(1e6 / 1450)
    assert step_summary(phases, 1e6, 10, overlap=True, learner=200.0)["step"] == 205


def test_public_configs_parameter_counts():
    """The published sizes: Qwen3-30B-A3B 30.5B / 3.3B active, Qwen3-235B-A22B 235B / 22B, DeepSeek-V3 671B / 37B."""
    for cfg, total, active in ((QWEN3_30B_A3B, 30.5e9, 3.3e9), (QWEN3_235B_A22B, 235e9, 22e9),
                               (DEEPSEEK_V3, 671e9, 37e9)):
        s = shape_from_config(cfg)
        assert s.total_params == pytest.approx(total, rel=0.01)
        assert s.active_params == pytest.approx(active, rel=0.03)


@pytest.mark.parametrize("run", [r for r in NEMO_RL_V06 if r.name.startswith("Qwen3")], ids=lambda r: r.name)
def test_calibration_within_2x_of_nemo_rl(run):
    """The model at its stated constants reproduces NeMo-RL v0.6's published H100 tokens/s/GPU within 2x
    (fixed published numbers: Qwen3-30B-A3B 1,102 on 32 GPUs, Qwen3-235B-A22B 58.9 on 128)."""
    p = predict_published(run)
    assert 0.5 <= p["ratio"] <= 2.0, p
    assert 0.5 <= run.published_step_s / p["step"] <= 2.0
    assert p["generation"] > p["update"]  # long reasoning rollouts: generation dominates the step


def test_deepseek_v3_row_is_reported():
    """Printed for reference (optional in the issue), not held to 2x: the model is ~4x optimistic there
    (NeMo-RL's fixed per-step costs, e.g. a ~55 s colocated refit, dominate at 512 GPUs; see NEMO_RL_V06)."""
    p = predict_published(next(r for r in NEMO_RL_V06 if r.name == "DeepSeek-V3"))
    assert p["ratio"] > 1 and p["published_tokens_per_s_per_gpu"] == 7.24


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("step3p5_flash")
    (d / "config.json").write_text(FLASH_JSON.read_text())
    return d


def test_plan_prints_the_step_time(flash_dir, capsys, monkeypatch):
    from mispo.cli import main

    monkeypatch.setenv("COLUMNS", "220")
    assert main(["plan", "recipes/step3p5_flash/math_expert.yaml", f"model.path={flash_dir}"]) == 0
    out = capsys.readouterr().out
    for text in ("predicted step time", "generation", "log-probs", "policy update", "critic", "refit",
                 "step (sync)", "step (async)", "tokens/s/GPU", "EP8", "TFLOP/s"):
        assert text in out, text
    assert main(["plan", "recipes/step3p5_flash/math_expert.yaml", f"model.path={flash_dir}", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["step_time"]
    rows = {r["expert_parallel"]: r for r in st["layouts"]}
    assert {1, 8} <= set(rows) and rows[1]["configured"]
    # ZeRO-3 gathers the 199B parameters each pass of every micro-batch; EP moves tokens instead
    assert rows[8]["update"] < rows[1]["update"] / 5
    for r in rows.values():
        assert r["step_async"] <= r["step_sync"] and st["async"] and r["step"] == r["step_async"]
        assert r["tokens_per_s_per_gpu"] == pytest.approx(st["tokens"] / (r["step"] * r["gpus"]))
