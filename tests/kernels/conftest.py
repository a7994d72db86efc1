"""Kernel tests run everywhere: on a machine without CUDA the Triton kernels run in the interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated (here: when `kernels.triton_moe` is imported)
and again while interpreting. So the variable is set while this conftest imports the kernels (before any
test module does; a module imported earlier in the session is reloaded) and, through an autouse fixture,
while each test in this directory runs. It is not left set for the rest of the session: subprocesses of
other tests (vLLM, ...) should not inherit it. On a CUDA machine nothing is set and the same tests run
the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def _import_kernels_for_this_machine() -> None:
    old = os.environ.get("TRITON_INTERPRET")
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from mispo.models.step3p5.kernels import triton_moe

        if not HAS_CUDA and triton_moe.HAS_TRITON and not triton_moe.INTERPRET:
            importlib.reload(triton_moe)  # imported earlier in the session without the interpreter
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_kernels_for_this_machine()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
