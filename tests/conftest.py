"""Shared test settings: GPU tests skip without CUDA; a tiny Step3p5 checkpoint per session."""

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
