"""Routed-experts kernels against the plain-torch reference (`torch_experts`), forward and gradients.

Without CUDA the Triton kernels run in the interpreter (see conftest.py); shapes are small on purpose.
bf16 results are judged against an fp32 oracle computed from the same bf16 inputs: the fused path must
be about as close to it as the bf16 reference is (errors are norm-relative, so a rare clamp decision
flipped by one ulp does not dominate).
"""

from __future__ import annotations

import pytest
import torch

from mispo.models.step3p5.backends import get_experts_backend
from mispo.models.step3p5.reference_ops import swiglu, torch_experts
from mispo.models.step3p5.kernels import moe
from mispo.models.step3p5.kernels import triton_moe as tk

needs_triton = pytest.mark.skipif(not tk.HAS_TRITON, reason="triton is not installed")
needs_grouped_mm = pytest.mark.skipif(moe._grouped_mm_fn is None, reason="torch has no grouped_mm")


def make_problem(n=24, k=3, e=6, h=64, i=32, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    """Random routing over experts 0..e-2 (the last expert gets no token) and random weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen) * scale
    ids = torch.stack([torch.randperm(e - 1, generator=gen)[:k] for _ in range(n)])
    tw = torch.rand(n, k, generator=gen) * 2
    ws = [torch.randn(e, i, h, generator=gen) * h ** -0.5, torch.randn(e, i, h, generator=gen) * h ** -0.5,
          torch.randn(e, h, i, generator=gen) * i ** -0.5]
    cast = dict(device=device, dtype=dtype)
    return x.to(**cast), ids.to(device), tw.to(device), [w.to(**cast) for w in ws]


def run(fn, problem, limit, dtype=None, **kw):
    """out and grads (x, topk_weights, gate, up, down) of a fixed linear read-out of the output."""
    x, ids, tw, ws = problem
    cast = {} if dtype is None else {"dtype": dtype}
    x = x.detach().to(**cast).clone().requires_grad_()
    tw = tw.detach().clone().requires_grad_()
    ws = [w.detach().to(**cast).clone().requires_grad_() for w in ws]
    out = fn(x, ids, tw, *ws, limit, **kw)
    probe = torch.linspace(-1, 1, out.shape[-1], device=out.device)
    (out.float() * probe).sum().backward()
    return [out.detach(), x.grad, tw.grad] + [w.grad for w in ws]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


NAMES = ["out", "dx", "d_topk_weights", "d_gate", "d_up", "d_down"]


# ---------------------------------------------------------------------- pieces
def test_tile_schedule_covers_each_row_once():
    counts = torch.tensor([0, 5, 16, 17, 0, 1, 40])
    bm = 16
    tile_expert, tile_row = tk.tile_schedule(counts, int(counts.sum()), bm)
    starts = torch.cumsum(counts, 0) - counts
    seen = torch.zeros(int(counts.sum()), dtype=torch.long)
    for e, r in zip(tile_expert.tolist(), tile_row.tolist()):
        if e < 0:
            continue
        end = int(starts[e] + counts[e])
        assert starts[e] <= r < end
        seen[r:min(r + bm, end)] += 1
    assert seen.eq(1).all()
    assert (tile_expert >= 0).sum() == sum(-(-c // bm) for c in counts.tolist())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_swiglu_kernels_match_autograd(device, dtype, limit):
    gen = torch.Generator().manual_seed(1)
    m, i = 10, 40  # i not a power of two: masked tail
    g, u, d = (torch.randn(m, i, generator=gen).to(device, dtype) for _ in range(3))
    w = torch.rand(m, generator=gen).to(device)
    gf, uf, wf = g.float().requires_grad_(), u.float().requires_grad_(), w.clone().requires_grad_()
    ref = swiglu(gf, uf, limit) * wf[:, None]
    ref.backward(d.float())
    hw = tk.swiglu_fwd(g, u, w, limit)
    hw2, dg, du, dw = tk.swiglu_bwd(g, u, w, d, limit)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(hw.float(), ref.detach(), **tol)
    torch.testing.assert_close(hw2, hw)
    torch.testing.assert_close(dg.float(), gf.grad, **tol)
    torch.testing.assert_close(du.float(), uf.grad, **tol)
    torch.testing.assert_close(dw, wf.grad, atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=1e-3)
    assert dw.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_kernel(device, dtype):
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(30, 48, generator=gen).to(device, dtype)
    idx = torch.randperm(30, generator=gen).view(10, 3).to(device)
    ref = src.float()[idx].sum(1)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(tk.gather_sum(src, idx).float(), ref, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_gemms_match_loop(device, dtype):
    """Uneven groups: empty experts, one with several row tiles, a ragged last tile; odd N and K."""
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([0, 3, 37, 16, 0, 9])
    rows, e, n, k = int(counts.sum()), counts.numel(), 40, 24
    ids = torch.repeat_interleave(torch.arange(e), counts)[:, None].to(device)
    groups = moe.ExpertGroups(ids, e)
    a = torch.randn(rows, k, generator=gen).to(device, dtype)
    w_t = torch.randn(e, n, k, generator=gen).to(device, dtype)  # used transposed (forward)
    w_n = torch.randn(e, k, n, generator=gen).to(device, dtype)  # used as is (dgrad)
    b = torch.randn(rows, n, generator=gen).to(device, dtype)
    exact = dtype == torch.bfloat16  # bf16 in, fp32 accumulate, round once: same as torch's matmul here
    tol = {} if exact else dict(atol=1e-4, rtol=1e-4)
    for w, trans_b in ((w_t, True), (w_n, False)):
        got, ref = moe._gmm("triton", a, w, groups, trans_b), moe._gmm("loop", a, w, groups, trans_b)
        torch.testing.assert_close(got, ref, **tol)
    dw = moe._gmm_wgrad("triton", a, b, groups)
    ref = moe._gmm_wgrad("loop", a, b, groups)
    tol = dict(atol=0, rtol=1e-2) if exact else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw.float(), ref.float(), **tol)
    assert dw[0].eq(0).all() and dw[4].eq(0).all()


@needs_grouped_mm
def test_grouped_mm_probe_on_cpu():
    assert moe.grouped_mm_usable(torch.device("cpu"), torch.float32, 64, 32)
    assert not moe.grouped_mm_usable(torch.device("cpu"), torch.bfloat16, 60, 32)  # 120-byte rows: misaligned


# ---------------------------------------------------------------------- the whole layer
COMBOS = [("grouped_mm", "torch"), ("triton", "triton"), ("grouped_mm", "triton"), ("loop", "torch")]


def _skip_unavailable(gemm, elementwise):
    if "triton" in (gemm, elementwise) and not tk.HAS_TRITON:
        pytest.skip("triton is not installed")
    if gemm == "grouped_mm" and moe._grouped_mm_fn is None:
        pytest.skip("torch has no grouped_mm")


@pytest.mark.parametrize("gemm,elementwise", COMBOS)
@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_fused_experts_fp32_matches_reference(device, gemm, elementwise, limit):
    _skip_unavailable(gemm, elementwise)
    if gemm == "grouped_mm" and not moe.grouped_mm_usable(device, torch.float32, 64, 32):
        pytest.skip("grouped_mm does not run fp32 here")
    problem = make_problem(device=device)
    ref = run(torch_experts, problem, limit)
    got = run(moe.fused_experts, problem, limit, gemm=gemm, elementwise=elementwise)
    for name, a, b in zip(NAMES, got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert got[2].dtype == torch.float32


@pytest.mark.parametrize("gemm,elementwise", COMBOS[:3])
@pytest.mark.parametrize("limit", [0.0, 7.0])
def test_fused_experts_bf16_as_accurate_as_reference(device, gemm, elementwise, limit):
    _skip_unavailable(gemm, elementwise)
    if gemm == "grouped_mm" and not moe.grouped_mm_usable(device, torch.bfloat16, 64, 32):
        pytest.skip("grouped_mm does not run bf16 here")
    problem = make_problem(dtype=torch.bfloat16, device=device, scale=4.0)  # scale: the clamp at 7 is active
    oracle = run(torch_experts, problem, limit, dtype=torch.float32)
    ref = run(torch_experts, problem, limit)
    got = run(moe.fused_experts, problem, limit, gemm=gemm, elementwise=elementwise)
    for name, g, r, o in zip(NAMES, got, ref, oracle):
        assert g.dtype == r.dtype, name
        assert rel(g, o) <= 1.5 * rel(r, o) + 2e-3, (name, rel(g, o), rel(r, o))
        assert rel(g, r) < 2e-2, (name, rel(g, r))


def test_fused_experts_frozen_weights_and_weights_without_grad(device):
    x, ids, tw, ws = make_problem(device=device)
    x = x.requires_grad_()
    out = moe.fused_experts(x, ids, tw, *ws, 0.0)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    torch_experts(x2, ids, tw, *ws, 0.0).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=2e-5, rtol=2e-5)


def test_fused_experts_no_tokens(device):
    x, ids, tw, ws = make_problem(device=device)
    out = moe.fused_experts(x[:0], ids[:0], tw[:0], *ws, 0.0)
    assert out.shape == (0, x.shape[1])


def test_registered_as_fused_backend():
    from mispo.models.step3p5 import kernels

    assert get_experts_backend("fused", torch.device("cpu")) is kernels.fused_experts


# ---------------------------------------------------------------------- the model with both fused backends
def test_tiny_model_with_fused_backends_matches_torch_backends():
    from mispo.models.step3p5 import Step3p5ForCausalLM
    from mispo.models.step3p5.tiny import tiny_config

    torch.manual_seed(0)
    ref_model = Step3p5ForCausalLM(tiny_config(attn_backend="torch", moe_backend="torch")).eval()
    fused_model = Step3p5ForCausalLM(tiny_config(attn_backend="fused", moe_backend="fused")).eval()
    fused_model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, ref_model.config.vocab_size, (1, 40))
    pos = torch.cat([torch.arange(25), torch.arange(15)])[None]  # two packed sequences
    outs = []
    for model in (ref_model, fused_model):
        model.zero_grad()
        out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((out.logits.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], atol=1e-4, rtol=1e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["grouped_mm", "triton"])
def test_fused_experts_cuda_bf16_realistic_shape(gemm):
    """Many experts, uneven routing, the released head sizes' alignment; bf16 as in training."""
    if gemm == "grouped_mm" and not moe.grouped_mm_usable(torch.device("cuda"), torch.bfloat16, 512, 256):
        pytest.skip("torch grouped_mm not usable on this GPU")
    problem = make_problem(n=1024, k=8, e=64, h=512, i=256, dtype=torch.bfloat16, device="cuda", scale=2.0)
    oracle = run(torch_experts, problem, 7.0, dtype=torch.float32)
    ref = run(torch_experts, problem, 7.0)
    got = run(moe.fused_experts, problem, 7.0, gemm=gemm)
    for name, g, r, o in zip(NAMES, got, ref, oracle):
        assert rel(g, o) <= 1.5 * rel(r, o) + 2e-3, (name, rel(g, o), rel(r, o))


@pytest.mark.gpu
def test_fused_experts_cuda_picks_a_fast_gemm_and_does_not_sync():
    x, ids, tw, ws = make_problem(n=256, k=8, e=32, h=256, i=128, dtype=torch.bfloat16, device="cuda")
    gemm = moe.pick_gemm(x, ws[0])
    assert gemm in ("grouped_mm", "triton")
    if gemm == "grouped_mm" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch's grouped_mm fallback below sm90 reads the offsets on the host")
    moe.fused_experts(x, ids, tw, *ws, 0.0)  # warm up (probe, autotune)
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.fused_experts(x, ids, tw, *ws, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_tiny_model_cuda_fused_backends_match_torch_backends():
    """End to end on the GPU: compiled flex attention + fused experts vs the reference backends, fp32."""
    from mispo.models.step3p5 import Step3p5ForCausalLM
    from mispo.models.step3p5.tiny import tiny_config

    torch.manual_seed(0)
    ref_model = Step3p5ForCausalLM(tiny_config(attn_backend="torch", moe_backend="torch")).cuda()
    fused_model = Step3p5ForCausalLM(tiny_config(attn_backend="fused", moe_backend="fused")).cuda()
    fused_model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, ref_model.config.vocab_size, (1, 300), device="cuda")
    pos = torch.cat([torch.arange(170), torch.arange(130)])[None].cuda()
    results = []
    for model in (ref_model, fused_model):
        out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-4, rtol=2e-4)
    for name, ref in results[0][1].items():
        assert rel(results[1][1][name], ref) < 1e-3, name
