"""The fused log-prob head: log p and entropy from the hidden states and the output projection, chunk by chunk,
equal to the logits path in values and in every gradient, on transformers' own dense and MoE models and on
Step3p5, with no [tokens, vocab] tensor in the forward or the backward; models that transform their logits
(Gemma 2's soft-capping) or wrap their head (LoRA on lm_head) keep the logits path."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_logprobs import LogitSizedTensors  # tests/learner is on sys.path (no __init__.py)

from mispo.algorithms.head_logprobs import head_chunk, head_logprobs
from mispo.algorithms.logits import logprobs_and_entropy
from mispo.families.tiny import TINY_FAMILIES, tiny_family_config
from mispo.learner.logprob_head import fused_head
from mispo.learner.models import use_fp32_lm_head
from mispo.learner.packing import forward_logprobs, pack_samples, token_logprobs_and_entropy


def _both_paths(n, h, v, dtype, fp32, temperature, chunk, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    coef = torch.randn(n, generator=g, dtype=torch.float64).float()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    out = []
    for fused in (True, False):
        if fused:
            lp, ent = head_logprobs(hidden, weight, bias, labels, temperature, True, fp32, chunk=chunk)
        else:
            z = torch.nn.functional.linear(*(t.float() if fp32 else t for t in (hidden, weight)),
                                           None if bias is None else (bias.float() if fp32 else bias))
            lp, ent = logprobs_and_entropy(z, labels, 7, temperature)
        (lp * coef).sum().add((ent * coef.flip(0)).sum()).backward()
        out.append((lp.detach(), ent.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(2, 60), chunk=st.integers(1, 50), seed=st.integers(0, 10**6),
       temperature=st.sampled_from([1.0, 0.7, 1.3]), with_bias=st.booleans())
def test_values_and_gradients_equal_the_logits_path(n, v, chunk, seed, temperature, with_bias):
    """float64 hidden states and head; both paths take the log-softmax in fp32, so they agree to fp32 rounding."""
    (lp, ent, grads), (lp2, ent2, grads2) = _both_paths(n, 6, v, torch.float64, False, temperature, chunk, seed,
                                                        with_bias)
    torch.testing.assert_close(lp, lp2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent2, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,fp32,tol", [(torch.float32, False, 1e-5), (torch.bfloat16, True, 1e-6),
                                            (torch.bfloat16, False, 2e-2)])
def test_float32_and_bfloat16_heads(dtype, fp32, tol):
    """fp32 and model.fp32_lm_head's product agree to rounding; a bf16 head's weight gradient is summed in bf16
    one chunk at a time (one rounding per chunk), so it agrees to bf16 precision."""
    (lp, ent, grads), (lp2, ent2, grads2) = _both_paths(37, 8, 50, dtype, fp32, 0.7, 5, seed=3)
    torch.testing.assert_close(lp, lp2, rtol=tol, atol=tol)
    torch.testing.assert_close(ent, ent2, rtol=tol, atol=tol)
    for a, b in zip(grads, grads2):
        assert a.dtype == b.dtype == dtype
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


def test_no_logit_sized_tensor_in_the_forward_or_the_backward():
    n, h, v, chunk = 65, 4, 500, 8
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    with LogitSizedTensors(2 * chunk * v) as mode:
        lp, ent = head_logprobs(hidden, weight, None, labels, 1.0, True, chunk=chunk)
        (lp.sum() + ent.sum()).backward()
    assert mode.count == 0 and weight.grad.shape == weight.shape
    with LogitSizedTensors(2 * chunk * v) as mode:  # the measurement sees the logits path's [n, v] tensors
        z = hidden @ weight.T
        logprobs_and_entropy(z, labels, chunk)[0].sum().backward()
    assert mode.count >= 2


def test_chunk_follows_the_vocabulary():
    assert head_chunk(128_896) == 260 and head_chunk(100) == (128 << 20) // 400 and head_chunk(10**9) == 16


def _tiny(family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = getattr(transformers, TINY_FAMILIES[family][1])(tiny_family_config(family, **overrides)).to(dtype)
    return model.train()


def _micro_batch(vocab: int, lengths=((3, 9), (5, 4), (2, 12))):
    from mispo.batch import Sample

    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(4, vocab, (p,), generator=g).tolist(),
                      response_ids=torch.randint(4, vocab, (r,), generator=g).tolist(), rollout_logprobs=[0.0] * r,
                      loss_mask=[1] * r, finish_reason="stop") for p, r in lengths]
    return pack_samples(samples, list(range(len(samples))), 4096)[0]


def _logits_path(model, mb, temperature):
    logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
    return token_logprobs_and_entropy(logits, mb.input_ids, temperature)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "qwen3_moe", "olmoe", "mixtral"])
def test_transformers_models_fused_equal_their_logits(family):
    model = _tiny(family)
    mb = _micro_batch(model.config.vocab_size)
    assert fused_head(model) is model.get_output_embeddings()
    results = []
    for fused in (True, False):
        lp, ent = forward_logprobs(model, mb, temperature=0.8, with_entropy=True) if fused else \
            _logits_path(model, mb, 0.8)
        (lp.sum() - 0.1 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (lp, ent, grads), (lp2, ent2, grads2) = results
    assert lp[0, -1] == 0 and ent[0, -1] == 0
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads2.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], grads2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_step3p5_and_a_bf16_fp32_head_fused_equal_their_logits(tiny_checkpoint):
    from mispo.learner.models import load_policy

    for dtype, fp32 in (("float32", False), ("bfloat16", True)):
        model = load_policy(tiny_checkpoint, dtype, fp32_lm_head=fp32).train()
        mb = _micro_batch(model.config.vocab_size)
        assert fused_head(model) is model.lm_head
        lp, ent = forward_logprobs(model, mb, with_entropy=True)
        lp.sum().backward()
        grad = model.lm_head.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        lp2, ent2 = _logits_path(model, mb, 1.0)
        lp2.sum().backward()
        torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, model.lm_head.weight.grad, rtol=1e-3, atol=1e-6)


def test_a_model_forward_holds_no_logit_sized_tensor():
    """At the release's vocabulary (128,896: 260 positions a chunk) a 600-token micro-batch of Qwen3-MoE."""
    vocab = 128_896
    model = _tiny("qwen3_moe", vocab_size=vocab, hidden_size=16, intermediate_size=32, head_dim=8)
    mb = _micro_batch(vocab, [(20, 180), (50, 150), (10, 190)])
    length = mb.num_tokens
    assert length == 600 and head_chunk(vocab) < length / 2
    fused_head(model)  # the one-time check runs the logits on 8 tokens; not part of the measured step
    with LogitSizedTensors((length - 1) * vocab) as mode:
        lp, ent = forward_logprobs(model, mb, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert mode.count == 0 and model.lm_head.weight.grad is not None
    with LogitSizedTensors((length - 1) * vocab) as mode:
        lp, ent = _logits_path(model, mb, 1.0)
        (lp.sum() + ent.sum()).backward()
    assert mode.count >= 2  # the logits and their gradient


def test_soft_capped_and_lora_heads_keep_the_logits_path():
    gemma = _tiny("gemma2", final_logit_softcapping=30.0)
    assert fused_head(gemma) is None
    mb = _micro_batch(gemma.config.vocab_size)
    lp, _ = forward_logprobs(gemma, mb)
    torch.testing.assert_close(lp, _logits_path(gemma, mb, 1.0)[0])

    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert fused_head(lora) is None
    plain = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused_head(plain) is plain.get_output_embeddings()


def test_a_model_that_changes_its_logits_unannounced_is_caught_by_the_check():
    """A head output the model rescales without a config field: the one-time check sees it."""
    model = _tiny("llama")
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    assert fused_head(model) is None


def test_fp32_head_marks_its_product(tiny_checkpoint):
    model = _tiny("llama", dtype=torch.bfloat16)
    use_fp32_lm_head(model)
    assert model.lm_head.fp32_product is True
