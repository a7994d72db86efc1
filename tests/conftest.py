"""Shared test settings: GPU tests skip without CUDA; a tiny Step3p5 checkpoint per session; a Ray
cluster per module that asks for one."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A release-format tiny Step3p5 checkpoint (with tokenizer) written once per test session."""
    from mispo.models.step3p5.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_step3p5"), seed=0)


@pytest.fixture(scope="module")  # torn down after the module: other modules start clusters of their own
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the module's tests (or the one already running)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
