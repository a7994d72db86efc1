"""Packed micro-batches of plain transformers causal LMs attend per sequence ("mispo_packed")."""

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from mispo.learner.models import load_policy
from mispo.learner.packed_attention import PACKED_ATTENTION, use_packed_attention
from mispo.learner.packing import token_logprobs

LENGTHS = [5, 9, 1, 17, 3, 12]  # a 1-token sequence, several windows' worth, lengths no bucket shares
VOCAB = 50
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)  # GQA: 2 query heads per key head


def llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def qwen2_sliding():  # layer 0 full attention, layer 1 a 4-token sliding window
    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return Qwen2ForCausalLM(config)


def mistral_sliding():  # every layer a 4-token sliding window
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4))


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _packed(seqs):
    return torch.cat(seqs)[None], torch.cat([torch.arange(len(s)) for s in seqs])[None]


def _packed_run(model, seqs, weights):
    """Per-sequence log-probs (within-sequence positions only) and parameter gradients, packed."""
    model.zero_grad()
    ids, pos = _packed(seqs)
    logp = token_logprobs(model(input_ids=ids, position_ids=pos).logits, ids)[0]
    out, start = [], 0
    for s in seqs:
        out.append(logp[start:start + len(s) - 1])
        start += len(s)
    sum((lp * w[:-1]).sum() for lp, w in zip(out, weights)).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}


def _unpacked_run(model, seqs, weights):
    """The same, one plain forward per sequence (transformers' default attention)."""
    model.zero_grad()
    out = []
    for s, w in zip(seqs, weights):
        lp = token_logprobs(model(input_ids=s[None]).logits, s[None])[0, :-1]
        (lp * w[:-1]).sum().backward()
        out.append(lp.detach())
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("build", [llama, qwen2_sliding, mistral_sliding])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_unpacked_logprobs_and_gradients(build, checkpointing):
    torch.manual_seed(0)
    reference = build().train()  # train mode: the learner's training forward (dropout is 0)
    assert reference.config._attn_implementation == "sdpa"
    packed = copy.deepcopy(reference)
    use_packed_attention(packed)
    if checkpointing:
        packed.gradient_checkpointing_enable()
    seqs = _sequences()
    weights = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in LENGTHS]

    got_lp, got_grad = _packed_run(packed, seqs, weights)
    want_lp, want_grad = _unpacked_run(reference, seqs, weights)
    for got, want in zip(got_lp, want_lp):
        assert torch.allclose(got, want, atol=1e-5)
    assert got_grad.keys() == want_grad.keys()
    for name in want_grad:
        assert torch.allclose(got_grad[name], want_grad[name], atol=1e-5), name


class FullLengthSquares(TorchDispatchMode):
    """Records every tensor an op produces whose last two dimensions are [n, n] (a mask or scores)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.n, self.n):
                self.seen.append((func.__name__, tuple(t.shape)))
        return out


def _squares(model, seqs):
    ids, pos = _packed(seqs)
    mode = FullLengthSquares(ids.shape[1])
    with mode:
        token_logprobs(model(input_ids=ids, position_ids=pos, use_cache=False).logits, ids).sum().backward()
    return mode.seen


@pytest.mark.parametrize("build", [llama, qwen2_sliding])
def test_no_full_length_mask_or_scores(build):
    torch.manual_seed(0)
    model = build()
    seqs = _sequences()
    # the check sees the default attention's [L, L] packed mask (and scores)
    assert _squares(model, seqs) != []
    use_packed_attention(model)
    assert _squares(model, seqs) == []


def test_load_policy_selects_packed_attention_and_exports_the_plain_config(tmp_path, tiny_checkpoint):
    torch.manual_seed(0)
    llama().save_pretrained(tmp_path / "llama")
    model = load_policy(tmp_path / "llama")
    assert model.config._attn_implementation == PACKED_ATTENTION
    model.save_pretrained(tmp_path / "export")
    assert PACKED_ATTENTION not in json.dumps(json.loads((tmp_path / "export" / "config.json").read_text()))
    assert load_policy(tiny_checkpoint).config._attn_implementation != PACKED_ATTENTION  # Step3p5: its own


def test_refusals():
    torch.manual_seed(0)
    model = llama()
    use_packed_attention(model)
    ids, pos = _packed(_sequences())
    padding = torch.ones_like(ids)
    padding[0, -1] = 0
    with pytest.raises(ValueError, match="padding mask"):
        model(input_ids=ids, attention_mask=padding)
    model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids))  # an all-ones mask is no mask
    with pytest.raises(ValueError, match="attention_dropout"):
        use_packed_attention(LlamaForCausalLM(LlamaConfig(**SMALL, attention_dropout=0.1)))
