"""The learner's chunked, temperature-aware log-prob path (`token_logprobs`, `response_logprobs`)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mispo.batch import Sample
from mispo.learner.packed_attention import use_packed_attention
from mispo.learner.packing import response_logprobs, token_logprobs, token_logprobs_and_entropy

L, V = 23, 37
CHUNKS = (1, 3, 7, L - 2, L - 1, 1000)  # 3 and 7 do not divide L - 1 = 22 scored positions


def _reference(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """Unchunked: the full fp32 log-softmax, gathered; and the entropy."""
    logp_all = torch.log_softmax(logits[0, :-1].float() / temperature, -1)
    lp = logp_all.gather(-1, ids[0, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = lp.new_zeros(1)
    return torch.cat([lp, zero])[None], torch.cat([ent, zero])[None]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, L, V, generator=g) * 3, torch.randint(0, V, (1, L), generator=g)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_unchunked_values_and_logit_gradients(chunk, temperature):
    logits, ids = _inputs()
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(1, L, generator=g), torch.randn(1, L, generator=g)  # any upstream gradients

    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(x, ids, temperature, chunk_size=chunk)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()

    y = logits.clone().requires_grad_(True)
    want_lp, want_ent = _reference(y, ids, temperature)
    ((want_lp * w_lp).sum() + (want_ent * w_ent).sum()).backward()

    assert lp.shape == ent.shape == (1, L) and lp.dtype == torch.float32
    assert torch.allclose(lp, want_lp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    assert lp[0, -1] == 0 and ent[0, -1] == 0
    assert torch.allclose(x.grad, y.grad, atol=1e-5)

    x.grad = None  # log-probs alone (no entropy term in the backward)
    (token_logprobs(x, ids, temperature, chunk_size=chunk) * w_lp).sum().backward()
    y.grad = None
    (_reference(y, ids, temperature)[0] * w_lp).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 5, 1000])
def test_gradients_reach_hidden_states_and_head(chunk):
    """In the training forward: hidden -> lm head -> chunked log-probs, gradients equal the unchunked ones."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, L, 16, generator=g)
    head = torch.randn(V, 16, generator=g)
    ids = torch.randint(0, V, (1, L), generator=g)

    def grads(fn):
        h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
        fn(h @ w.T).sum().backward()
        return h.grad, w.grad

    got = grads(lambda z: token_logprobs(z, ids, 0.7, chunk_size=chunk))
    want = grads(lambda z: _reference(z, ids, 0.7)[0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_temperature_is_the_sampling_distribution():
    logits, ids = _inputs(3)
    got = token_logprobs(logits, ids, temperature=0.7, chunk_size=4)
    want = torch.log_softmax(logits / 0.7, -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(got[0, :-1], want, atol=1e-5)
    assert not torch.allclose(got, token_logprobs(logits, ids, chunk_size=4), atol=1e-2)  # it is applied


class LargestFloat32(TorchDispatchMode):
    """Records the largest number of elements of any fp32 tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def _largest_fp32_tensor(chunk: int, length: int, vocab: int) -> int:
    """Forward and backward of log-probs + entropy of bf16 logits; the model's own logits (and their
    gradient) are bf16, so any fp32 tensor is the log-prob path's own."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, length, vocab, generator=g).bfloat16().requires_grad_(True)
    ids = torch.randint(0, vocab, (1, length), generator=g)
    with LargestFloat32() as mode:
        lp, ent = token_logprobs_and_entropy(logits, ids, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    return mode.largest


def test_memory_at_most_one_chunk_of_fp32_logits():
    length, vocab, chunk = 65, 500, 8
    assert _largest_fp32_tensor(chunk, length, vocab) <= chunk * vocab
    # the measurement sees a full-length fp32 copy when there is one (one chunk = the whole row)
    assert _largest_fp32_tensor(1000, length, vocab) >= (length - 1) * vocab


class LogitSizedTensors(TorchDispatchMode):
    """Counts the tensors of at least `numel` elements that ops produce (views included: a view's output
    is a new tensor object, so only count ops that allocate, i.e. whose output shares no input storage)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


def test_the_backward_allocates_one_gradient_of_the_logits():
    """Not a second one for the last position's slice, and nothing for a detached entropy."""
    length, vocab = 65, 500
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, length, vocab, generator=g).bfloat16().requires_grad_(True)
    ids = torch.randint(0, vocab, (1, length), generator=g)
    lp, ent = token_logprobs_and_entropy(logits, ids, chunk_size=8)
    with LogitSizedTensors((length - 1) * vocab) as mode:
        (lp.sum() + ent.detach().sum()).backward()
    assert mode.count == 1 and logits.grad.shape == logits.shape
    assert logits.grad[0, -1].abs().sum() == 0  # the last position predicts nothing


def test_entropy_gradient_with_masked_vocabulary_entries():
    """-inf logits (a vocabulary mask): no nan, zero gradient there, the rest as on the unmasked columns."""
    g = torch.Generator().manual_seed(7)
    logits, ids = torch.randn(1, L, V, generator=g), torch.randint(4, V, (1, L), generator=g)
    w = torch.randn(1, L, generator=g)
    x = logits.clone()
    x[..., :4] = float("-inf")
    x.requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(x, ids, 0.7, chunk_size=5)
    ((ent * w).sum() + lp.sum()).backward()
    y = logits[..., 4:].clone().requires_grad_(True)
    want_lp, want_ent = _reference(y, ids - 4, 0.7)
    ((want_ent * w).sum() + want_lp.sum()).backward()
    assert not x.grad.isnan().any() and (x.grad[..., :4] == 0).all()
    assert torch.allclose(x.grad[..., 4:], y.grad, atol=1e-5)


def test_response_logprobs_at_a_temperature():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    use_packed_attention(model)  # as load_policy does: the two samples share one packed micro-batch
    samples = [Sample(prompt_ids=prompt, response_ids=response, rollout_logprobs=[0.0] * len(response),
                      loss_mask=[1] * len(response), finish_reason="stop")
               for prompt, response in (([1, 2, 3], [4, 5]), ([6], [7, 8, 9]))]
    got = response_logprobs(model, samples, max_tokens=1 << 10, temperature=0.7)
    for row, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0] / 0.7, -1)
        p = len(s.prompt_ids)
        want = logp[p - 1:-1].gather(-1, ids[0, p:, None]).squeeze(-1)
        assert torch.allclose(got[row, : len(s.response_ids)], want, atol=1e-5)
