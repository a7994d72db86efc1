"""The learners' log-probs without logits: for the length of one call, the model's output projection
returns log p(next token) and the entropy computed from its input hidden states chunk by chunk
(`mispo.algorithms.head_logprobs`), instead of the [1, L, V] logits.

    head = fused_head(model)                  # the model's nn.Linear head, or None: use the logits
    with head_computes_logprobs(head, labels, temperature, with_entropy=True):
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits   # [1, L, 2]: log p, entropy

The head module is still called by the model's own forward, so DeepSpeed's ZeRO-3 hooks gather its weight
for the forward and again for the backward, LoRA and routing replay are untouched, and the model's
other outputs are as before. What the model does to its logits after the head must be nothing:
`fused_head` refuses a model whose config names a logit transform (Gemma 2's soft-capping, Cohere's
logit_scale, Granite's logits_scaling) and checks once per model, on 8 tokens, that the fused log-probs
equal those from the model's own logits; otherwise the learner uses the logits (chunked, as before).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from mispo.algorithms.head_logprobs import head_logprobs
from mispo.algorithms.logits import logprobs_from_logits

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_VERIFIED = "_mispo_fused_head_ok"  # the check's answer, kept on the head module


def _module(model) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):  # a DeepSpeed engine: its module
        model = model.module
    return model


def _transform(config) -> str | None:
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0):
            return name
    return None


@contextmanager
def head_computes_logprobs(head: nn.Linear, labels: torch.Tensor, temperature: float, with_entropy: bool):
    """While open, `head(hidden [1, L, H])` returns [1, L, 2] (log p(labels), entropy) or [1, L, 1] (log p),
    fp32, p = softmax(head(hidden) / temperature); model.fp32_lm_head's product when the head carries it."""
    fp32 = getattr(head, "fp32_product", False)
    patched = head.__dict__.get("forward")  # model.fp32_lm_head replaces the forward on the instance

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        logp, ent = head_logprobs(hidden, head.weight, head.bias, labels, temperature, with_entropy, fp32)
        return logp[..., None] if ent is None else torch.stack([logp, ent], -1)

    head.forward = forward
    try:
        yield
    finally:
        if patched is None:
            del head.forward
        else:
            head.forward = patched


def fused_head(model) -> nn.Linear | None:
    """The output projection, when the fused log-probs may replace the model's logits: an nn.Linear head
    (not LoRA-wrapped), no logit transform in the config, and, checked once per model in eval mode without
    gradients (every ZeRO-3 rank makes the same first call), log-probs equal to the logits' within 1e-3."""
    module = _module(model)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    if not hasattr(head, _VERIFIED):
        setattr(head, _VERIFIED, _transform(module.config) is None and _same_as_logits(model, module, head))
    return head if getattr(head, _VERIFIED) else None


@torch.no_grad()
def _same_as_logits(model, module: nn.Module, head: nn.Linear) -> bool:
    device = head.weight.device
    ids = (torch.arange(8, device=device) * 7 + 1)[None] % module.config.vocab_size
    pos = torch.arange(8, device=device)[None]
    labels = torch.cat([ids[0, 1:], ids.new_zeros(1)])[None]
    training = module.training
    module.eval()
    try:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        expected = logprobs_from_logits(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        with head_computes_logprobs(head, labels, 1.0, with_entropy=False):
            fused = model(input_ids=ids, position_ids=pos, use_cache=False).logits[..., 0].reshape(-1)
    finally:
        module.train(training)
    return fused.shape == expected.shape and bool(torch.allclose(fused, expected.float(), rtol=1e-3, atol=1e-3))
