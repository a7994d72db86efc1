"""Routed experts as grouped GEMMs: one autograd.Function, hand-written backward, no host syncs.

    forward                                               backward (go = d out)
    order  = argsort(topk_ids)  (rows sorted by expert)     gy   = go[token_of]
    xs     = x[token_of]                                    dhw  = gmm(gy, Wd)            (dgrad, down)
    g, u   = gmm(xs, Wg^T), gmm(xs, Wu^T)                   hw, dg, du, dw = swiglu_bwd(g, u, w, dhw)
    hw     = SwiGLU_L(g, u) * w          (fused kernel)     dWd  = gmm_wgrad(gy, hw)
    y      = gmm(hw, Wd^T)                                  dWg, dWu = gmm_wgrad(dg, xs), gmm_wgrad(du, xs)
    out[n] = sum_k y[inv[n, k]]          (gather-sum)       dx   = gather_sum(gmm(dg, Wg) + gmm(du, Wu))

Design choices
- The routing weight is applied inside the SwiGLU kernel (before down_proj; exact, by linearity), so the
  un-permutation is a plain fp32-accumulated gather-sum and d(topk_weights) = sum_i h_i * dhw_i falls
  out of the SwiGLU backward without keeping the [N*K, H] expert outputs. Saved for backward: g and u
  ([N*K, I] each), the sort; xs and hw are recomputed (cheap gathers / elementwise).
- The un-permutation is a gather (each token reads its K rows), not an atomic scatter-add: deterministic,
  and the K partial outputs are summed in fp32, not in bf16 as `index_add_` would.
- GEMMs, in order of preference (probed once per device and dtype):
    "grouped_mm": torch's grouped GEMM (`torch.nn.functional.grouped_mm`, CUTLASS on Hopper; torch also
                  runs it on CPU). Our layouts need no per-expert padding: row-major activations keep every
                  group 16-byte aligned, and the weight gradient uses (column-major A, row-major B), the
                  only 2D x 2D layout torch allows empty groups in.
    "triton":     our Triton grouped GEMM (`triton_moe`), for GPUs/dtypes where grouped_mm is missing
                  (fp32, older torch, pre-Hopper without a fast path). Also what the interpreter tests run.
    "loop":       one matmul per expert (host sync for the counts) when neither is available.
- bf16 in, fp32 accumulation in every GEMM and reduction, bf16 out; d(topk_weights) is fp32.
- Override the choice with `MISPO_STEP3P5_GEMM=grouped_mm|triton|loop` (benchmarks, debugging).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..reference_ops import torch_experts
from . import triton_moe as tk

_GEMMS = ("grouped_mm", "triton", "loop")
_grouped_mm_fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_PROBES: dict = {}


# ---------------------------------------------------------------------- sorting tokens by expert
class ExpertGroups:
    """Rows (token, slot) sorted by expert: row r holds token token_of[r]; expert e owns rows
    [ends[e] - counts[e], ends[e]); inv[n, k] is the row of token n's k-th slot."""

    def __init__(self, topk_ids: torch.Tensor, num_experts: int):
        num_tokens, top_k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        self.token_of = torch.div(self.order, top_k, rounding_mode="floor")
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(flat.numel(), device=flat.device)
        self.inv = inv.view(num_tokens, top_k)
        # scatter_add, not bincount: bincount syncs with the host on CUDA to size its output.
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        self.ends = torch.cumsum(self.counts, 0).to(torch.int32)
        self.num_rows = flat.numel()
        self._tiles = None

    def tiles(self):
        if self._tiles is None:
            self._tiles = tk.tile_schedule(self.counts, self.num_rows, tk.GMM_BLOCK_M)
        return self._tiles


# ---------------------------------------------------------------------- GEMM implementations
def _gmm(kind: str, a: torch.Tensor, w: torch.Tensor, groups: ExpertGroups, trans_b: bool) -> torch.Tensor:
    """c[rows_e] = a[rows_e] @ (w[e].T if trans_b else w[e])."""
    if kind == "grouped_mm":
        return _grouped_mm_fn(a, w.transpose(-2, -1) if trans_b else w, offs=groups.ends)
    if kind == "triton":
        return tk.gmm(a, w, groups.ends, groups.tiles(), trans_b)
    out_dim = w.shape[1] if trans_b else w.shape[2]
    c = a.new_empty(a.shape[0], out_dim)
    start = 0
    for e, count in enumerate(groups.counts.tolist()):
        if count:
            we = w[e].T if trans_b else w[e]
            c[start:start + count] = a[start:start + count] @ we
            start += count
    return c


def _gmm_wgrad(kind: str, a: torch.Tensor, b: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """c [E, P, Q] with c[e] = a[rows_e].T @ b[rows_e] (zeros for experts without rows)."""
    if kind == "grouped_mm":
        c = _grouped_mm_fn(a.t(), b, offs=groups.ends)
        if not _PROBES.get(("empty_zero", a.device.type, a.device.index, a.dtype), True):
            c = c.masked_fill((groups.counts == 0)[:, None, None], 0)
        return c
    if kind == "triton":
        return tk.gmm_wgrad(a, b, groups.ends)
    c = a.new_zeros(groups.counts.numel(), a.shape[1], b.shape[1])
    start = 0
    for e, count in enumerate(groups.counts.tolist()):
        if count:
            c[e] = a[start:start + count].T @ b[start:start + count]
            start += count
    return c


def grouped_mm_usable(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """Does torch's grouped GEMM run here, for these sizes, and agree with a plain matmul? Probed once."""
    if _grouped_mm_fn is None:
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (hidden * itemsize) % 16 or (inter * itemsize) % 16:  # strides must be 16-byte aligned
        return False
    key = ("ok", device.type, device.index, dtype)
    if key not in _PROBES:
        _PROBES[key] = _probe_grouped_mm(device, dtype)
    return _PROBES[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(24, 32, generator=gen).to(device=device, dtype=dtype)
        w = torch.randn(3, 16, 32, generator=gen).to(device=device, dtype=dtype)
        offs = torch.tensor([8, 16, 24], dtype=torch.int32, device=device)
        c = _grouped_mm_fn(a, w.transpose(-2, -1), offs=offs)
        ref = torch.cat([a[0:8].float() @ w[0].float().T, a[8:16].float() @ w[1].float().T,
                         a[16:24].float() @ w[2].float().T])
        tol = 1e-1 if dtype != torch.float32 else 1e-3
        if not torch.allclose(c.float(), ref, atol=tol, rtol=tol):
            return False
        g = torch.randn(24, 16, generator=gen).to(device=device, dtype=dtype)
        ends = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)  # expert 1 has no rows
        dw = _grouped_mm_fn(g.t(), a, offs=ends)
        ref_dw = torch.stack([g[0:8].float().T @ a[0:8].float(), torch.zeros(16, 32, device=device),
                              g[8:24].float().T @ a[8:24].float()])
        _PROBES[("empty_zero", device.type, device.index, dtype)] = bool(dw[1].float().abs().max() == 0)
        ok = torch.allclose(dw[[0, 2]].float(), ref_dw[[0, 2]], atol=tol * 4, rtol=tol)
        return bool(ok)
    except Exception:  # unsupported device / dtype / build
        return False


def pick_gemm(x: torch.Tensor, gate_proj: torch.Tensor) -> str:
    forced = os.environ.get("MISPO_STEP3P5_GEMM", "").strip()
    if forced:
        if forced not in _GEMMS:
            raise ValueError(f"MISPO_STEP3P5_GEMM = {forced!r}; expected one of {_GEMMS}")
        return forced
    if grouped_mm_usable(x.device, x.dtype, gate_proj.shape[2], gate_proj.shape[1]):
        return "grouped_mm"
    if tk.usable(x):
        return "triton"
    return "loop"


# ---------------------------------------------------------------------- elementwise implementations
def _swiglu_fwd(kind: str, g, u, w, limit):
    if kind == "triton":
        return tk.swiglu_fwd(g, u, w, limit)
    a = F.silu(g.float())
    uf = u.float()
    if limit > 0:
        a, uf = a.clamp(max=limit), uf.clamp(-limit, limit)
    return (a * uf * w[:, None]).to(g.dtype)


def _swiglu_bwd(kind: str, g, u, w, d_hw, limit):
    if kind == "triton":
        return tk.swiglu_bwd(g, u, w, d_hw, limit)
    gf, uf, d = g.float(), u.float(), d_hw.float()
    s = torch.sigmoid(gf)
    silu = gf * s
    a, c = silu, uf
    if limit > 0:
        a, c = silu.clamp(max=limit), uf.clamp(-limit, limit)
    h = a * c
    dw = (h * d).sum(-1)
    dh = d * w[:, None]
    dg = dh * c * (s * (1 + gf * (1 - s)))
    du = dh * a
    if limit > 0:
        dg = torch.where(silu <= limit, dg, 0.0)
        du = torch.where((uf >= -limit) & (uf <= limit), du, 0.0)
    return (h * w[:, None]).to(g.dtype), dg.to(g.dtype), du.to(u.dtype), dw


def _gather_sum(kind: str, src, idx):
    if kind == "triton":
        return tk.gather_sum(src, idx)
    n, k = idx.shape
    return src.index_select(0, idx.reshape(-1)).view(n, k, -1).sum(1, dtype=torch.float32).to(src.dtype)


# ---------------------------------------------------------------------- the autograd function
class RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, limit, gemm, elementwise):
        groups = ExpertGroups(topk_ids, gate_proj.shape[0])
        w_sorted = topk_weights.reshape(-1).float()[groups.order].contiguous()
        xs = x.index_select(0, groups.token_of)
        g = _gmm(gemm, xs, gate_proj, groups, trans_b=True)
        u = _gmm(gemm, xs, up_proj, groups, trans_b=True)
        hw = _swiglu_fwd(elementwise, g, u, w_sorted, limit)
        y = _gmm(gemm, hw, down_proj, groups, trans_b=True)
        out = _gather_sum(elementwise, y, groups.inv)
        ctx.save_for_backward(x, gate_proj, up_proj, down_proj, g, u, w_sorted)
        ctx.groups, ctx.limit, ctx.gemm, ctx.elementwise = groups, limit, gemm, elementwise
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx, go):
        x, gate_proj, up_proj, down_proj, g, u, w_sorted = ctx.saved_tensors
        groups, gemm, ew = ctx.groups, ctx.gemm, ctx.elementwise
        need_x, _, need_w, need_g, need_u, need_d = ctx.needs_input_grad[:6]
        go = go.contiguous()
        gy = go.index_select(0, groups.token_of)
        d_hw = _gmm(gemm, gy, down_proj, groups, trans_b=False)
        hw, dg, du, dw_sorted = _swiglu_bwd(ew, g, u, w_sorted, d_hw, ctx.limit)
        del d_hw
        d_down = _gmm_wgrad(gemm, gy, hw, groups) if need_d else None
        del gy, hw
        d_gate = d_up = None
        if need_g or need_u:
            xs = x.index_select(0, groups.token_of)
            d_gate = _gmm_wgrad(gemm, dg, xs, groups) if need_g else None
            d_up = _gmm_wgrad(gemm, du, xs, groups) if need_u else None
            del xs
        dx = None
        if need_x:
            dxs = _gmm(gemm, dg, gate_proj, groups, trans_b=False)
            dxs += _gmm(gemm, du, up_proj, groups, trans_b=False)
            dx = _gather_sum(ew, dxs, groups.inv)
        d_weights = dw_sorted[groups.inv].to(ctx.weights_dtype) if need_w else None
        return dx, None, d_weights, d_gate, d_up, d_down, None, None, None


def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                  limit: float, *, gemm: str | None = None, elementwise: str | None = None) -> torch.Tensor:
    """The "fused" routed-experts backend (contract in `backends.py`); same result as `torch_experts`."""
    if x.shape[0] == 0 or topk_ids.numel() == 0:
        return torch_experts(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, limit)
    dtype = gate_proj.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype).contiguous()
        weights = [w.to(dtype) for w in (gate_proj, up_proj, down_proj)]
        gemm = gemm or pick_gemm(xc, weights[0])
        elementwise = elementwise or ("triton" if tk.usable(xc) else "torch")
        out = RoutedExperts.apply(xc, topk_ids, topk_weights, *weights, float(limit), gemm, elementwise)
    return out.to(x.dtype)
