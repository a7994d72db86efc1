"""The accelerator the job's processes name to DeepSpeed (set in the driver and in every Ray worker)."""

from __future__ import annotations


def deepspeed_env() -> dict[str, str]:
    """DS_ACCELERATOR=cpu on a machine without CUDA (DeepSpeed's CPU accelerator, named rather than detected)."""
    import torch

    return {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
