"""The learners' models: the policy (any Hugging Face causal LM, Step3p5 included) and a critic
made of a causal-LM backbone with a scalar value head.

Packed micro-batches attend per sequence: Step3p5 through its own attention backends, every other
model through the "mispo_packed" transformers attention implementation (`packed_attention.py`); the model's
family (`mispo.families`) says which and refuses what the learner cannot run.

Value head: V(prefix) = w . h_last + b, where h_last is the backbone's final (normed) hidden state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from mispo.families import family_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_policy(path: str | Path, dtype: str = "float32", gradient_checkpointing: bool = False,
                attn_backend: str | None = None, moe_backend: str | None = None,
                fp32_lm_head: bool = False) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    family = family_of(model)
    family.check_learner(model.config)
    if fp32_lm_head:
        use_fp32_lm_head(model)
    family.prepare_policy(model, attn_backend, moe_backend)  # packed attention (Step3p5: its own backends)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def use_fp32_lm_head(model: nn.Module) -> None:
    """The model's output projection in fp32: logits = float(h) @ float(W)^T (+ float(b)), the weight kept in
    its own dtype and its gradient flowing back through the cast (vLLM's head_dtype float32 on the engine
    side). The module's own call, and so DeepSpeed's ZeRO-3 gather hooks, stay in place."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model.fp32_lm_head: the output projection of {type(model).__name__} is a "
                         f"{type(head).__name__}, not a Linear; fix: model.fp32_lm_head: false")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward
    head.fp32_product = True  # the fused log-prob head (logprob_head.py) computes the same product


class ValueModel(nn.Module):
    """Critic: backbone(input) -> final hidden state -> Linear(hidden, 1). Outputs [1, L] values."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, position_ids=position_ids, output_hidden_states=True,
                            logits_to_keep=1)
        h = out.hidden_states[-1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save_pretrained(path)
        torch.save(self.value_head.state_dict(), path / "value_head.pt")

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", gradient_checkpointing: bool = False) -> "ValueModel":
        model = cls(load_policy(path, dtype, gradient_checkpointing))
        head = Path(path) / "value_head.pt"
        if head.exists():
            model.value_head.load_state_dict(torch.load(head, map_location="cpu"))
        return model
