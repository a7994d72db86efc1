"""model.fp32_lm_head on the learner side: a bf16 policy's logits are the fp32 product of its bf16 hidden
states and bf16 head weight, and the gradient reaches the bf16 weight through the cast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mispo.learner.models import load_policy, use_fp32_lm_head


def test_bf16_policy_projects_in_fp32_and_trains_its_bf16_head(tiny_checkpoint):
    model = load_policy(tiny_checkpoint, "bfloat16", fp32_lm_head=True)
    plain = load_policy(tiny_checkpoint, "bfloat16")
    ids = torch.tensor([[3, 10, 20, 30, 4, 11, 12]])
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    exact = hidden.float() @ model.lm_head.weight.float().T
    torch.testing.assert_close(logits, exact, rtol=0, atol=0)
    rounded = plain(input_ids=ids).logits
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - exact).abs().max() > 0  # what it avoids
    logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16 and model.lm_head.weight.grad.abs().sum() > 0


def test_a_head_that_is_not_linear_is_refused():
    class Odd(nn.Module):
        def get_output_embeddings(self):
            return nn.Embedding(4, 2)

    with pytest.raises(ValueError, match="model.fp32_lm_head"):
        use_fp32_lm_head(Odd())
