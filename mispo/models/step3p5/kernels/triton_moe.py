"""Triton kernels for the routed experts: grouped GEMMs, fused (weighted, clamped) SwiGLU, gather-sum.

Rows are (token, slot) pairs sorted by expert; group e owns rows [ends[e-1], ends[e]).

    gmm(a, w, groups, trans_b)     c[rows_e] = a[rows_e] @ (w[e].T if trans_b else w[e])   fwd / dgrad
    gmm_wgrad(a, b, groups)        c[e] = a[rows_e].T @ b[rows_e]                            wgrad
    swiglu_fwd(g, u, w, L)         hw = clamp(silu(g), max=L) * clamp(u, -L, L) * w          (L = 0: no clamp)
    swiglu_bwd(g, u, w, dhw, L)    -> hw (recomputed), dg, du, dw = sum_i h_i * dhw_i
    gather_sum(src, idx)           out[n] = sum_k src[idx[n, k]]   (the un-permutation; fp32 accumulation)

All accumulate in fp32 and store in the input dtype. No kernel needs a host sync: the GEMM tile
schedule is built on the device with a static upper bound on the number of tiles.

Importing this module never fails: without Triton, `HAS_TRITON` is False and `usable()` says no.
`usable(t)` is True for CUDA tensors, and for CPU tensors when the Triton interpreter is on
(`TRITON_INTERPRET=1`) both now and when this module was imported -- Triton reads that variable when a
kernel is decorated and again while interpreting (see tests/kernels/conftest.py).

Interpreter note (triton 3.9): the interpreter mis-handles bf16 arithmetic and bf16 `tl.dot` (it
returns garbage), so under the interpreter every loaded tile is cast to fp32 first (`CAST_F32`).
On a GPU the GEMMs run on bf16 tiles with fp32 accumulators; fp32 inputs use IEEE (no TF32) dots.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs may lack it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Rows per GEMM tile; the tile schedule (which expert, which first row) is built for this size.
GMM_BLOCK_M = 16 if INTERPRET else 64


def usable(t: torch.Tensor) -> bool:
    """Can the Triton kernels run on tensors living where `t` lives?

    CPU tensors need the interpreter both when the kernels were decorated (import) and now (the
    interpreter reads the variable again while running).
    """
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return not INTERPRET
    return t.device.type == "cpu" and INTERPRET and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAS_TRITON:

    # Only builtins of triton.language below, no functions it defines with @triton.jit (sigmoid, sum,
    # zeros, cdiv): those are decorated when triton is imported, so if triton was imported before the
    # interpreter was switched on they would stay compiled-mode and break interpreted kernels.
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _rne(x, FIX: tl.constexpr):
        """Pre-round fp32 so the interpreter's truncating fp32 -> bf16 cast rounds to nearest even."""
        if FIX:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            x = tl.where(x == 0.0, x, bits.to(tl.float32, bitcast=True))
        return x

    # ------------------------------------------------------------------ elementwise: SwiGLU
    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, w_ptr, out_ptr, n_rows, n_cols, limit, HAS_LIMIT: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = row_ok[:, None] & (cols[None, :] < n_cols)
            offs = rows[:, None] * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
            a = g / (1.0 + tl.exp(-g))
            if HAS_LIMIT:
                a = tl.minimum(a, limit)
                u = tl.minimum(tl.maximum(u, -limit), limit)
            tl.store(out_ptr + offs, _rne(a * u * w, RNE).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, u_ptr, w_ptr, dhw_ptr, hw_ptr, dg_ptr, du_ptr, dw_ptr, n_rows, n_cols,
                           limit, HAS_LIMIT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                           RNE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        dw_acc = tl.full([ROWS, BLOCK], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = row_ok[:, None] & (cols[None, :] < n_cols)
            offs = rows[:, None] * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.load(dhw_ptr + offs, mask=m, other=0.0).to(tl.float32)
            s = 1.0 / (1.0 + tl.exp(-g))
            silu = g * s
            a = silu
            c = u
            if HAS_LIMIT:
                a = tl.minimum(silu, limit)
                c = tl.minimum(tl.maximum(u, -limit), limit)
            h = a * c
            dw_acc += h * d
            dh = d * w
            dg = dh * c * (s * (1.0 + g * (1.0 - s)))
            du = dh * a
            if HAS_LIMIT:  # torch.clamp passes the gradient where min <= x <= max
                dg = tl.where(silu <= limit, dg, 0.0)
                du = tl.where((u >= -limit) & (u <= limit), du, 0.0)
            tl.store(hw_ptr + offs, _rne(h * w, RNE).to(hw_ptr.dtype.element_ty), mask=m)
            tl.store(dg_ptr + offs, _rne(dg, RNE).to(dg_ptr.dtype.element_ty), mask=m)
            tl.store(du_ptr + offs, _rne(du, RNE).to(du_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + rows, tl.reduce(dw_acc, 1, _add), mask=row_ok)

    # ------------------------------------------------------------------ un-permutation
    @triton.jit
    def _gather_sum_kernel(src_ptr, idx_ptr, out_ptr, n_rows, n_cols, K: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr, RNE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols[None, :] < n_cols)
        acc = tl.full([ROWS, BLOCK], 0.0, tl.float32)
        for k in tl.static_range(K):
            src_rows = tl.load(idx_ptr + rows * K + k, mask=row_ok, other=0).to(tl.int64)
            src = src_ptr + src_rows[:, None] * n_cols + cols[None, :]
            acc += tl.load(src, mask=m, other=0.0).to(tl.float32)
        out = out_ptr + rows[:, None] * n_cols + cols[None, :]
        tl.store(out, _rne(acc, RNE).to(out_ptr.dtype.element_ty), mask=m)

    # ------------------------------------------------------------------ grouped GEMMs
    @triton.jit
    def _gmm_kernel(a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, N, K,
                    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    CAST_F32: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(tile_expert_ptr + tile)
        if expert >= 0:
            row0 = tl.load(tile_row_ptr + tile).to(tl.int64)
            end = tl.load(ends_ptr + expert).to(tl.int64)
            rm = row0 + tl.arange(0, BM)
            rn = pid_n * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
            b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be
                      + rk[:, None] * stride_bk + rn[None, :] * stride_bn)
            acc = tl.full((BM, BN), 0.0, tl.float32)
            for k0 in range(0, K, BK):
                a = tl.load(a_ptrs, mask=(rm[:, None] < end) & (rk[None, :] < K - k0), other=0.0)
                b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
                if CAST_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
                a_ptrs += BK * stride_ak
                b_ptrs += BK * stride_bk
            c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
            c_mask = (rm[:, None] < end) & (rn[None, :] < N)
            tl.store(c_ptrs, _rne(acc, RNE).to(c_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _gmm_wgrad_kernel(a_ptr, b_ptr, c_ptr, ends_ptr, P, Q,
                          stride_am, stride_ap, stride_bm, stride_bq, stride_ce, stride_cp, stride_cq,
                          BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                          CAST_F32: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr):
        expert = tl.program_id(0)
        pid = tl.program_id(1)
        num_q = (Q + BQ - 1) // BQ
        pid_p = pid // num_q
        pid_q = pid % num_q
        end = tl.load(ends_ptr + expert).to(tl.int64)
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
        rp = pid_p * BP + tl.arange(0, BP)
        rq = pid_q * BQ + tl.arange(0, BQ)
        rk = tl.arange(0, BK)
        acc = tl.full((BP, BQ), 0.0, tl.float32)
        for m0 in range(start, end, BK):
            rows = m0 + rk
            a = tl.load(a_ptr + rows[None, :] * stride_am + rp[:, None] * stride_ap,
                        mask=(rows[None, :] < end) & (rp[:, None] < P), other=0.0)  # [BP, BK] = A^T tile
            b = tl.load(b_ptr + rows[:, None] * stride_bm + rq[None, :] * stride_bq,
                        mask=(rows[:, None] < end) & (rq[None, :] < Q), other=0.0)  # [BK, BQ]
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + rp[:, None] * stride_cp + rq[None, :] * stride_cq
        c_mask = (rp[:, None] < P) & (rq[None, :] < Q)
        tl.store(c_ptrs, _rne(acc, RNE).to(c_ptr.dtype.element_ty), mask=c_mask)

    if INTERPRET:  # one small config: the interpreter would otherwise "benchmark" every candidate
        _GMM_CONFIGS = [triton.Config({"BN": 64, "BK": 32}, num_warps=1, num_stages=1)]
        _WGRAD_CONFIGS = [triton.Config({"BP": 64, "BQ": 64, "BK": 32}, num_warps=1, num_stages=1)]
    else:
        _GMM_CONFIGS = [
            triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
        ]
        _WGRAD_CONFIGS = [
            triton.Config({"BP": bp, "BQ": bq, "BK": bk}, num_warps=w, num_stages=s)
            for bp, bq, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 256, 64, 8, 3)]
        ]
    _gmm_tuned = triton.autotune(configs=_GMM_CONFIGS, key=["N", "K"])(_gmm_kernel)
    _gmm_wgrad_tuned = triton.autotune(configs=_WGRAD_CONFIGS, key=["P", "Q"])(_gmm_wgrad_kernel)


def _rne_flag(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _dot_flags(dtype: torch.dtype) -> dict:
    return {"CAST_F32": INTERPRET, "IEEE": INTERPRET or dtype == torch.float32, "RNE": _rne_flag(dtype)}


# ---------------------------------------------------------------------- host wrappers
def _rows_and_block(cols: int) -> tuple[int, int]:
    """(rows per program, columns per step) for the row-wise kernels."""
    if INTERPRET:  # few, large programs: the interpreter pays per operation, not per element
        return 32, min(1024, _next_pow2(cols))
    return 4, min(512, _next_pow2(cols))


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, limit: float) -> torch.Tensor:
    """hw [M, I] = SwiGLU(g, u) * w[:, None]; g/u [M, I] contiguous, w [M] fp32."""
    rows, cols = g.shape
    out = torch.empty_like(g)
    if rows:
        per, block = _rows_and_block(cols)
        _swiglu_fwd_kernel[(triton.cdiv(rows, per),)](g, u, w, out, rows, cols, float(limit),
                                                      HAS_LIMIT=limit > 0, ROWS=per, BLOCK=block,
                                                      RNE=_rne_flag(g.dtype))
    return out


def swiglu_bwd(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, d_hw: torch.Tensor, limit: float):
    """Backward of `swiglu_fwd` given d(hw): returns (hw recomputed, dg, du, dw fp32 [M])."""
    rows, cols = g.shape
    hw, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(u)
    dw = torch.empty(rows, dtype=torch.float32, device=g.device)
    if rows:
        per, block = _rows_and_block(cols)
        _swiglu_bwd_kernel[(triton.cdiv(rows, per),)](g, u, w, d_hw, hw, dg, du, dw, rows, cols, float(limit),
                                                      HAS_LIMIT=limit > 0, ROWS=per, BLOCK=block,
                                                      RNE=_rne_flag(g.dtype))
    return hw, dg, du, dw


def gather_sum(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out [N, H] with out[n] = sum_k src[idx[n, k]] (fp32 accumulation); src [M, H], idx [N, K]."""
    n, k = idx.shape
    cols = src.shape[1]
    out = torch.empty(n, cols, dtype=src.dtype, device=src.device)
    if n:
        per, block = _rows_and_block(cols)
        grid = (triton.cdiv(n, per), triton.cdiv(cols, block))
        _gather_sum_kernel[grid](src, idx.contiguous(), out, n, cols, K=k, ROWS=per, BLOCK=block,
                                 RNE=_rne_flag(src.dtype))
    return out


def tile_schedule(counts: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_expert, tile_row) for row tiles that never straddle two experts, built on the device.

    Sized by the static bound ceil(M / BM) + E so no host sync is needed; unused tiles have expert -1.
    """
    num_experts = counts.numel()
    max_tiles = (num_rows + block_m - 1) // block_m + num_experts
    tiles = (counts + block_m - 1) // block_m
    cum_tiles = torch.cumsum(tiles, 0)
    starts = torch.cumsum(counts, 0) - counts
    t = torch.arange(max_tiles, device=counts.device, dtype=cum_tiles.dtype)
    expert = torch.searchsorted(cum_tiles, t, right=True)
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    row = starts[e] + (t - (cum_tiles[e] - tiles[e])) * block_m
    tile_expert = torch.where(valid, e, torch.full_like(e, -1)).to(torch.int32)
    tile_row = torch.where(valid, row, torch.zeros_like(row)).to(torch.int64)
    return tile_expert, tile_row


def gmm(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor],
        trans_b: bool) -> torch.Tensor:
    """c[rows_e] = a[rows_e] @ (w[e].T if trans_b else w[e]); a [M, K], w [E, N, K] or [E, K, N]."""
    rows, depth = a.shape
    if trans_b:  # w[e] is [N, K]; read it as [K, N]
        n = w.shape[1]
        s_be, s_bk, s_bn = w.stride(0), w.stride(2), w.stride(1)
    else:
        n = w.shape[2]
        s_be, s_bk, s_bn = w.stride(0), w.stride(1), w.stride(2)
    c = torch.empty(rows, n, dtype=a.dtype, device=a.device)
    if rows == 0:
        return c
    tile_expert, tile_row = tiles
    grid = lambda meta: (tile_expert.numel(), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _gmm_tuned[grid](a, w, c, tile_expert, tile_row, ends, n, depth,
                     a.stride(0), a.stride(1), s_be, s_bk, s_bn, c.stride(0), c.stride(1),
                     BM=GMM_BLOCK_M, **_dot_flags(a.dtype))
    return c


def gmm_wgrad(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """c [E, P, Q] with c[e] = a[rows_e].T @ b[rows_e]; experts with no rows get zeros."""
    p, q = a.shape[1], b.shape[1]
    num_experts = ends.numel()
    c = torch.empty(num_experts, p, q, dtype=a.dtype, device=a.device)
    grid = lambda meta: (num_experts, triton.cdiv(p, meta["BP"]) * triton.cdiv(q, meta["BQ"]))  # noqa: E731
    _gmm_wgrad_tuned[grid](a, b, c, ends, p, q, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                           c.stride(0), c.stride(1), c.stride(2), **_dot_flags(a.dtype))
    return c
