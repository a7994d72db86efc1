"""Helpers shared by the rollout tests and their fixtures (conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

INIT_SCALE = 0.2  # peaked outputs, so the two checkpoints' log-probs differ a lot
ENGINE = {"kv_cache_memory_bytes": 256 << 20}  # a small KV cache per engine (CPU memory)
MAX_MODEL_LEN = 1024


def write_checkpoint(path: Path, seed: int) -> Path:
    from safetensors.torch import load_file, save_file

    from mispo.models.step3p5.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(path, seed=seed, init_scale=INIT_SCALE)
    file = path / "model.safetensors"
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed + 100)
    for name, value in tensors.items():
        if name.endswith(".moe.router_bias"):
            tensors[name] = torch.randn(value.shape, generator=gen) * 0.1
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def state_buckets(path: Path, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The training model's state dict in buckets, as PolicyWorker.weight_buckets makes them."""
    from mispo.models.step3p5 import Step3p5ForCausalLM

    state = Step3p5ForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    buckets, current, size = [], [], 0
    for name, tensor in state.items():
        current.append((name, tensor.detach().clone()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])
