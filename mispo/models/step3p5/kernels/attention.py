"""Fused attention for Step3p5: causal, optional sliding window, GQA, packed / padded batches.

Two maintained kernels, no attention kernel of our own:

- FlashAttention (`flash_attn`, when installed): `flash_attn_varlen_func(..., causal=True,
  window_size=(W - 1, 0))` (key j visible when i - j <= W - 1, i.e. i - j < W) for packed batches,
  `flash_attn_func` for plain ones. Fastest fwd+bwd on Hopper/Ampere, O(T*W) work for windowed layers.
  It cannot express padding masks (`layout.attention_mask`) without un-padding, so those go to flex.
- FlexAttention (`torch.nn.attention.flex_attention`, compiled on CUDA): handles every layout in the
  contract with one `mask_mod` (causal & window & same segment & key not padding, | diagonal so padding
  rows match the reference) and a block-sparse `BlockMask`. Flex's generated Triton kernels do fwd and
  bwd; our part is the block mask, built *analytically* from per-block min/max positions and segment
  ids in O((T/128)^2) -- never a T x T mask, no compile of `create_block_mask`. A block pair is skipped
  when no (q, k) in it can be visible, "full" (mask_mod not evaluated) only when every pair is visible.
  For a window W the kernels touch ~(W/128 + 2) key blocks per query block: O(T*W) work and memory.
  The window and the segment / padding ids are tensors captured by the one mask_mod, so layers with
  different windows and batches with different layouts reuse one compiled kernel (the compiled-CPU test
  checks there is no recompile). The mask is cached on the layout: every layer of a forward shares it.

A Triton kernel of our own would add nothing these two lack here; the head-wise sigmoid gate stays in
the model (one elementwise op that neither kernel can take as an epilogue; torch.compile fuses it).

On CPU the backend falls back to the reference (`torch_attention`): flex has no CPU backward and eager
flex materialises the full score matrix anyway. `flex_attention_forward` is exposed for tests (eager
or compiled flex on CPU, forward only).

Choose the kernel with `MISPO_STEP3P5_ATTN=auto|flash|flex|torch` (default auto: flash when installed
and the layout has no padding mask, else flex; torch off CUDA).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..layout import SequenceLayout
from ..reference_ops import torch_attention

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    HAS_FLEX = True
except Exception:  # pragma: no cover - torch < 2.5
    BlockMask = flex_attention = None
    HAS_FLEX = False

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAS_FLASH = True
except Exception:
    flash_attn_func = flash_attn_varlen_func = None
    HAS_FLASH = False

BLOCK_SIZE = 128
_IMPLS = ("auto", "flash", "flex", "torch")
_compiled_flex = None


def _flex(compiled: bool):
    global _compiled_flex
    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


# ---------------------------------------------------------------------- block mask
def _segments_and_keep(layout: SequenceLayout, batch: int, length: int, device: torch.device):
    seg = layout.segment_ids
    if seg is None:
        seg = torch.zeros(batch, length, dtype=torch.int32, device=device)
    seg = seg.to(device, torch.int32)
    keep = layout.attention_mask
    if keep is None:
        keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    keep = keep.to(device).bool()
    return seg.expand(batch, length), keep.expand(batch, length)


def block_visibility(layout: SequenceLayout, length: int, window: int | None, device: torch.device,
                     block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool [B, nb, nb] over (query block, key block).

    any(visible) in a block pair  =>  partial | full;   full  =>  all pairs visible (in range).
    Exact for contiguous segments (what `SequenceLayout.build` makes) without padding; with padding or
    scattered segments some blocks are visited in vain (never skipped wrongly): mask_mod sorts them out.
    """
    batch = layout.position_ids.shape[0]
    nb = -(-length // block_size)
    pad = nb * block_size - length
    seg, keep = _segments_and_keep(layout, batch, length, device)
    lo = torch.arange(nb, device=device) * block_size
    hi = (lo + block_size - 1).clamp(max=length - 1)
    any_ = lo[None, :] <= hi[:, None]  # [q, k]: some key at or before some query
    all_ = hi[None, :] <= lo[:, None]  # every key at or before every query
    if window is not None:
        any_ = any_ & (lo[:, None] - hi[None, :] < window)
        all_ = all_ & (hi[:, None] - lo[None, :] < window)
    big = torch.iinfo(torch.int32).max
    smin = F.pad(seg, (0, pad), value=big).view(batch, nb, block_size).amin(-1)
    smax = F.pad(seg, (0, pad), value=-big).view(batch, nb, block_size).amax(-1)
    seg_any = (smin[:, :, None] <= smax[:, None, :]) & (smin[:, None, :] <= smax[:, :, None])
    single = smin == smax
    seg_all = single[:, :, None] & single[:, None, :] & (smin[:, :, None] == smin[:, None, :])
    k_any = F.pad(keep, (0, pad), value=False).view(batch, nb, block_size).any(-1)
    k_all = F.pad(keep, (0, pad), value=True).view(batch, nb, block_size).all(-1)
    any_ = any_[None] & seg_any & k_any[:, None, :]
    all_ = all_[None] & seg_all & k_all[:, None, :]
    if pad:
        all_[:, :, -1] = False  # the ragged last key block always goes through mask_mod
    any_ = any_ | torch.eye(nb, dtype=torch.bool, device=device)[None]  # the diagonal is always visible
    return any_ & ~all_, all_


def _to_kv_blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~m).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num[:, None].contiguous(), idx[:, None].contiguous()  # [B, 1, nq], [B, 1, nq, nk]


def _make_mask_mod(seg: torch.Tensor, keep: torch.Tensor, window: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (q_idx - kv_idx < window)
        visible = visible & (seg[b, q_idx] == seg[b, kv_idx]) & keep[b, kv_idx]
        return visible | (q_idx == kv_idx)

    return mask_mod


def build_block_mask(layout: SequenceLayout, length: int, window: int | None, device: torch.device,
                     block_size: int = BLOCK_SIZE) -> "BlockMask":
    """The flex BlockMask for this layout and window (one mask_mod for every layout: no recompiles)."""
    batch = layout.position_ids.shape[0]
    nb = -(-length // block_size)
    pad = nb * block_size - length
    partial, full = block_visibility(layout, length, window, device, block_size)
    seg, keep = _segments_and_keep(layout, batch, length, device)
    # mask_mod may be evaluated on the padded tail of the last block: pad what it indexes.
    seg = F.pad(seg, (0, pad), value=-1).contiguous()
    keep = F.pad(keep, (0, pad), value=False).contiguous()
    reach = window if window is not None else nb * block_size + 1
    win = torch.tensor(reach, device=device, dtype=torch.int64)
    kv_num, kv_idx = _to_kv_blocks(partial)
    full_num, full_idx = _to_kv_blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=_make_mask_mod(seg, keep, win), seq_lengths=(length, length))


def cached_block_mask(layout: SequenceLayout, length: int, window: int | None,
                      device: torch.device) -> "BlockMask":
    """One block mask per (layout, length, window): every layer of a forward (and its recompute) shares it."""
    cache = getattr(layout, "__dict__", {}).setdefault("_flex_block_masks", {})  # no __dict__: no cache
    key = (length, window, str(device))
    if key not in cache:
        cache[key] = build_block_mask(layout, length, window, device)
    return cache[key]


# ---------------------------------------------------------------------- kernels
def flex_attention_forward(q, k, v, layout: SequenceLayout, window: int | None, scale: float,
                           compiled: bool | None = None) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D] through flex_attention."""
    length = q.shape[1]
    block_mask = cached_block_mask(layout, length, window, q.device)
    fn = _flex(q.is_cuda if compiled is None else compiled)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _cu_seqlens(layout: SequenceLayout, batch: int, length: int, device: torch.device):
    if batch == 1 and layout.cu_seqlens is not None:
        cu = layout.cu_seqlens.to(device, torch.int32)
        max_len = layout.max_seqlen or int((cu[1:] - cu[:-1]).max())
        return cu, max_len
    seg = layout.segment_ids
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    bounds = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([bounds, torch.tensor([batch * length], device=bounds.device)]).to(device, torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_attention_forward(q, k, v, layout: SequenceLayout, window: int | None,
                            scale: float) -> torch.Tensor:
    """FlashAttention with its native sliding window; packed batches through the varlen entry point."""
    batch, length, hq, d = q.shape
    window_size = (window - 1, 0) if window is not None else (-1, -1)
    if layout.segment_ids is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window_size)
    cu, max_len = _cu_seqlens(layout, batch, length, q.device)
    out = flash_attn_varlen_func(q.reshape(batch * length, hq, d), k.reshape(batch * length, -1, d),
                                 v.reshape(batch * length, -1, d), cu, cu, max_len, max_len,
                                 softmax_scale=scale, causal=True, window_size=window_size)
    return out.view(batch, length, hq, d)


def flash_applicable(q: torch.Tensor, layout: SequenceLayout) -> bool:
    return (HAS_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and layout.attention_mask is None and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def choose_impl(q: torch.Tensor, layout: SequenceLayout) -> str:
    impl = os.environ.get("MISPO_STEP3P5_ATTN", "auto").strip() or "auto"
    if impl not in _IMPLS:
        raise ValueError(f"MISPO_STEP3P5_ATTN = {impl!r}; expected one of {_IMPLS}")
    if impl != "auto":
        return impl
    if not q.is_cuda:
        return "torch"
    if flash_applicable(q, layout):
        return "flash"
    return "flex" if HAS_FLEX else "torch"


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout,
                    window: int | None, scale: float) -> torch.Tensor:
    """The "fused" attention backend (contract in `backends.py`)."""
    impl = choose_impl(q, layout)
    if impl == "flash":
        return flash_attention_forward(q, k, v, layout, window, scale)
    if impl == "flex":
        return flex_attention_forward(q, k, v, layout, window, scale)
    return torch_attention(q, k, v, layout, window, scale)
