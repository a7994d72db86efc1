"""The vllm.LLM arguments of a rollout engine (mispo.rollout.vllm_engine.engine_kwargs): the recipe's
tensor / expert parallel sizes reach the engine on GPU; CPU engines are unchanged single-process ones."""

from __future__ import annotations

import pytest

from mispo.config import RolloutConfig
from mispo.rollout.vllm_engine import EXTENSION, engine_kwargs

CFG = RolloutConfig(max_model_len=2048, gpu_memory_utilization=0.5, engine_kwargs={"kv_cache_memory_bytes": 1 << 28})


def test_cpu_engine_is_single_process():
    kwargs = engine_kwargs("/ckpt", CFG, "float32", 3, cpu=True)
    assert kwargs == {"model": "/ckpt", "dtype": "float32", "seed": 3, "max_model_len": 2048,
                      "gpu_memory_utilization": 0.5, "enforce_eager": True, "logprobs_mode": "processed_logprobs",
                      "worker_extension_cls": EXTENSION, "enable_chunked_prefill": False,
                      "kv_cache_memory_bytes": 1 << 28}
    for tp, ep in ((2, False), (1, True)):
        with pytest.raises(ValueError, match="rollout_tensor_parallel"):
            engine_kwargs("/ckpt", CFG, "float32", 3, cpu=True, tensor_parallel=tp, expert_parallel=ep)


def test_gpu_engine_gets_the_parallel_sizes():
    kwargs = engine_kwargs("/ckpt", CFG, "bfloat16", 0, cpu=False, tensor_parallel=8, expert_parallel=True)
    assert kwargs["tensor_parallel_size"] == 8 and kwargs["enable_expert_parallel"] is True
    assert kwargs["distributed_executor_backend"] == "mp"  # workers use the GPUs the actor holds
    assert kwargs["enforce_eager"] is False and "enable_chunked_prefill" not in kwargs
    single = engine_kwargs("/ckpt", CFG, "bfloat16", 0, cpu=False)
    assert (single["tensor_parallel_size"], single["enable_expert_parallel"]) == (1, False)
    assert "distributed_executor_backend" not in single


def test_recipe_cannot_set_the_sizes_in_engine_kwargs():
    with pytest.raises(ValueError, match="resources.rollout_tensor_parallel"):
        RolloutConfig(engine_kwargs={"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="resources.rollout_expert_parallel"):
        RolloutConfig(engine_kwargs={"enable_expert_parallel": True})


def test_fp32_lm_head_reaches_the_engine_and_is_owned_by_the_model_section():
    cfg = RolloutConfig(engine_kwargs={"hf_overrides": {"rope_theta": 1.0}})
    kwargs = engine_kwargs("/ckpt", cfg, "bfloat16", 0, cpu=True, fp32_lm_head=True)
    assert kwargs["hf_overrides"] == {"rope_theta": 1.0, "head_dtype": "float32"}  # the user's overrides kept
    assert "hf_overrides" not in engine_kwargs("/ckpt", CFG, "bfloat16", 0, cpu=True)
    with pytest.raises(ValueError, match="model.fp32_lm_head"):
        RolloutConfig(engine_kwargs={"hf_overrides": {"head_dtype": "float32"}})
