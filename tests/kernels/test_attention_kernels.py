"""Fused attention (flex / flash) against the reference `torch_attention`.

Without a GPU: the analytic block mask is checked block by block against the dense visibility mask,
flex's forward runs eagerly (checks the mask_mod) and once compiled on CPU (checks the block sparsity:
compiled flex skips and trusts blocks as the BlockMask says; eager flex ignores it). Flex has no CPU
backward, so gradients are checked on a GPU (`gpu` tests).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mispo.models.step3p5.backends import get_attention_backend
from mispo.models.step3p5.layout import SequenceLayout
from mispo.models.step3p5.reference_ops import torch_attention, visibility_mask
from mispo.models.step3p5.kernels import attention as A

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
needs_flex = pytest.mark.skipif(not A.HAS_FLEX, reason="torch has no flex_attention")


def layouts(batch_for_plain: int, length: int):
    """Every layout the contract allows: plain, packed B == 1 (cu_seqlens), packed B > 1, padded."""
    yield "plain", SequenceLayout.build((batch_for_plain, length), torch.device("cpu"))
    pos = torch.cat([torch.arange(n) for n in (13, 40, length - 53)])[None]
    yield "packed", SequenceLayout.build((1, length), torch.device("cpu"), position_ids=pos)
    pos2 = torch.stack([torch.cat([torch.arange(n) for n in (30, length - 30)]),
                        torch.cat([torch.arange(n) for n in (5, 17, length - 22)])])
    yield "packed_b2", SequenceLayout.build((2, length), torch.device("cpu"), position_ids=pos2)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :20] = 0  # left padding
    mask[1, length - 35:] = 0  # right padding
    yield "padded", SequenceLayout.build((2, length), torch.device("cpu"), attention_mask=mask)


def to_device(layout: SequenceLayout, device) -> SequenceLayout:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return SequenceLayout(position_ids=move(layout.position_ids), segment_ids=move(layout.segment_ids),
                          attention_mask=move(layout.attention_mask), cu_seqlens=move(layout.cu_seqlens),
                          max_seqlen=layout.max_seqlen)


def dense_block_truth(layout, length, window, block):
    """(any visible, all in-range pairs visible) per block pair, from the dense reference mask."""
    vis = visibility_mask(layout, length, window, torch.device("cpu"))[:, 0]
    batch, nb = vis.shape[0], -(-length // block)
    pad = nb * block - length
    blocks = F.pad(vis, (0, pad, 0, pad)).view(batch, nb, block, nb, block)
    in_range = torch.zeros(nb * block, dtype=torch.bool)
    in_range[:length] = True
    in_range = (in_range[:, None] & in_range[None, :]).view(nb, block, nb, block)
    return blocks.any(-1).any(2), (blocks | ~in_range[None]).all(-1).all(2)


# ---------------------------------------------------------------------- the block mask
@pytest.mark.parametrize("length", [64, 100])
@pytest.mark.parametrize("window", [None, 1, 7, 40])
def test_block_visibility_is_exact(length, window):
    for name, layout in layouts(2, length):
        partial, full = A.block_visibility(layout, length, window, torch.device("cpu"), block_size=16)
        any_vis, all_vis = (t.expand_as(partial) for t in dense_block_truth(layout, length, window, 16))
        assert not (partial & full).any(), name
        assert not (any_vis & ~(partial | full)).any(), name  # no block with a visible pair is skipped
        if layout.attention_mask is None:  # exact: no block is visited in vain
            assert torch.equal(partial | full, any_vis), name
        assert not (full & ~all_vis).any(), name  # a full block never hides a masked pair
        expected_full = (all_vis & any_vis).clone()
        if length % 16:
            expected_full[:, :, -1] = False  # the ragged last key block always goes through mask_mod
        assert torch.equal(full, expected_full), name


def test_windowed_block_mask_is_linear_in_length():
    """8k tokens, W = 512: each query block visits at most W/128 + 2 key blocks (O(T*W) work)."""
    layout = SequenceLayout.build((1, 8192), torch.device("cpu"))
    partial, full = A.block_visibility(layout, 8192, 512, torch.device("cpu"))
    visited = (partial | full).sum(-1)
    assert int(visited.max()) <= 512 // 128 + 2
    assert int(partial.sum(-1).max()) <= 2  # only the diagonal and the window edge evaluate mask_mod


# ---------------------------------------------------------------------- flex on CPU (forward)
@needs_flex
@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_eager_forward_matches_reference(window, dtype):
    gen = torch.Generator().manual_seed(0)
    for name, layout in layouts(2, 100):
        batch = layout.position_ids.shape[0]
        q = torch.randn(batch, 100, 4, 16, generator=gen).to(dtype)
        k, v = (torch.randn(batch, 100, 2, 16, generator=gen).to(dtype) for _ in range(2))
        ref = torch_attention(q.float(), k.float(), v.float(), layout, window, 0.25)
        got = A.flex_attention_forward(q, k, v, layout, window, 0.25, compiled=False)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.float(), ref, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_flex
def test_flex_compiled_cpu_forward_uses_the_block_mask():
    """One compile (~15 s on 2 cores) covers every layout and window: the mask_mod is the same code."""
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(0)
    length = 300  # three 128-blocks, the last ragged
    graphs_before = counters["stats"]["unique_graphs"]
    for name, layout in [(n, lay) for n, lay in layouts(2, length) if lay.position_ids.shape[0] == 2]:
        for window in (None, 50, 130):
            q = torch.randn(2, length, 4, 32, generator=gen)
            k, v = (torch.randn(2, length, 2, 32, generator=gen) for _ in range(2))
            ref = torch_attention(q, k, v, layout, window, 0.2)
            got = A.flex_attention_forward(q, k, v, layout, window, 0.2, compiled=True)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name, w=window: f"{n} W={w}: {m}")
    assert counters["stats"]["unique_graphs"] - graphs_before <= 1  # no recompiles across layouts/windows


# ---------------------------------------------------------------------- the backend
def test_fused_backend_registered_and_falls_back_on_cpu():
    from mispo.models.step3p5 import kernels

    if A.HAS_FLEX or A.HAS_FLASH:
        assert get_attention_backend("fused", torch.device("cpu")) is kernels.fused_attention
    gen = torch.Generator().manual_seed(0)
    layout = dict(layouts(2, 80))["packed"]
    q = torch.randn(1, 80, 4, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 80, 2, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 80, 2, 16, generator=gen, requires_grad=True)
    out = A.fused_attention(q, k, v, layout, 9, 0.25)
    torch.testing.assert_close(out, torch_attention(q, k, v, layout, 9, 0.25))
    out.sum().backward()  # CPU: the reference, with gradients
    assert q.grad is not None and k.grad is not None


def test_impl_choice(monkeypatch):
    layout = SequenceLayout.build((1, 8), torch.device("cpu"))
    q = torch.zeros(1, 8, 2, 16)
    assert A.choose_impl(q, layout) == "torch"  # CPU
    monkeypatch.setenv("MISPO_STEP3P5_ATTN", "flex")
    assert A.choose_impl(q, layout) == "flex"
    monkeypatch.setenv("MISPO_STEP3P5_ATTN", "nope")
    with pytest.raises(ValueError):
        A.choose_impl(q, layout)


@needs_flex
def test_tiny_model_runs_flex_path_on_cpu(monkeypatch):
    """The model calling the flex path (eager, no grad on CPU) gives the torch backend's logits."""
    from mispo.models.step3p5 import Step3p5ForCausalLM
    from mispo.models.step3p5.tiny import tiny_config

    torch.manual_seed(0)
    ref_model = Step3p5ForCausalLM(tiny_config(attn_backend="torch", moe_backend="torch")).eval()
    flex_model = Step3p5ForCausalLM(tiny_config(attn_backend="fused", moe_backend="torch")).eval()
    flex_model.load_state_dict(ref_model.state_dict())
    monkeypatch.setenv("MISPO_STEP3P5_ATTN", "flex")
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 37))
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 30:] = 0
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits
        got = flex_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- GPU
def _impls():
    out = ["flex"] if A.HAS_FLEX else []
    return out + (["flash"] if A.HAS_FLASH else [])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("window", [None, 64, 200])
def test_fused_attention_cuda_fwd_bwd_matches_reference(monkeypatch, impl, window):
    monkeypatch.setenv("MISPO_STEP3P5_ATTN", impl)
    gen = torch.Generator().manual_seed(0)
    length, hq, hkv, d = 700, 12, 4, 128
    for name, layout in layouts(2, length):
        if impl == "flash" and layout.attention_mask is not None:
            continue  # flash does not take padding masks; the backend sends those to flex
        layout = to_device(layout, "cuda")
        batch = layout.position_ids.shape[0]
        tensors = [torch.randn(batch, length, h, d, generator=gen).cuda().bfloat16().requires_grad_()
                   for h in (hq, hkv, hkv)]
        probe = torch.randn(batch, length, hq, d, generator=gen).cuda()
        results = []
        for fn in (A.fused_attention, torch_attention):
            for t in tensors:
                t.grad = None
            out = fn(*tensors, layout, window, d ** -0.5)
            if layout.attention_mask is not None:  # padding rows are ignored by the model
                out = out * layout.attention_mask[:, :, None, None]
            (out.float() * probe).sum().backward()
            results.append([out.detach().float()] + [t.grad.float() for t in tensors])
        for what, got, ref in zip(["out", "dq", "dk", "dv"], *results):
            err = (got - ref).norm() / ref.norm()
            assert err < 1e-2, (impl, name, window, what, float(err))


@pytest.mark.gpu
@pytest.mark.skipif(not A.HAS_FLEX, reason="torch has no flex_attention")
def test_windowed_flex_memory_is_linear(monkeypatch):
    """32k tokens, W = 512: peak memory stays near the size of q/k/v/out (a T x T mask alone: 1 GiB)."""
    monkeypatch.setenv("MISPO_STEP3P5_ATTN", "flex")
    length, hq, hkv, d = 32768, 8, 2, 128
    layout = to_device(SequenceLayout.build((1, length), torch.device("cpu")), "cuda")
    q = torch.randn(1, length, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, length, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, length, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A.fused_attention(q, k, v, layout, 512, d ** -0.5).sum().backward()  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    A.fused_attention(q, k, v, layout, 512, d ** -0.5).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * q.numel() * q.element_size(), extra / 2**20
