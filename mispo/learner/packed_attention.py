"""Per-sequence attention for packed micro-batches of any Hugging Face causal LM.

A packed micro-batch is one row holding several sequences whose position ids restart at 0.
Transformers' default "sdpa" masks it with one [L, L] mask (cost ~ L^2 per layer); and with the
default `use_cache=True` it does not mask it at all (its packing detection is skipped when a
cache object exists), so each sequence attends to the ones packed before it.

`use_packed_attention(model)` selects the implementation "mispo_packed", registered through
transformers' two extension points:

- `AttentionMaskInterface`: the mask function builds no mask. It returns None for full-attention
  layers and a `SlidingWindow` marker for sliding-window layers, and refuses what it cannot honour
  (padding masks, a filled KV cache, custom mask overlays, bidirectional masks).
- `AttentionInterface`: splits q/k/v at the sequence boundaries and attends causally within each
  sequence: flash-attn's varlen kernel on CUDA when `flash_attn` is installed, else
  `segment_attention` (one SDPA per group of similar-length sequences, the Step3p5 reference
  backend's). Boundaries come from `position_ids` by transformers' own rule (a sequence starts
  where the position does not follow the previous one), once per forward, not per layer.

Handled: GQA / MQA, sliding windows (the module's `sliding_window` argument, the flash-attention
contract, or the mask's window), logit soft-capping (Gemma 2) and attention sinks (gpt-oss), both on the
plain-torch path. Refused with an error naming the cause: attention dropout, position biases, non-causal
attention.
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass

import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from mispo.ops.segment_attention import segment_attention

PACKED_ATTENTION = "mispo_packed"


@dataclass(frozen=True)
class SlidingWindow:
    """What the mask function hands a sliding-window layer: query i sees key j when i - j < size."""

    size: int


def packed_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                use_vmap: bool = False, **kwargs) -> SlidingWindow | None:
    """The `AttentionMaskInterface` function of "mispo_packed": no mask tensor at all."""
    if kv_length != q_length or int(q_offset) != 0 or int(kv_offset) != 0:
        raise ValueError(f"{PACKED_ATTENTION} attention runs full-sequence forwards only (queries "
                         f"{q_length}, keys {kv_length}, offset {int(q_offset)}): no KV-cache decoding")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{PACKED_ATTENTION} attention takes no padding mask: pack the sequences into one "
                         "row with position ids restarting at 0 instead (mispo.learner.packing)")
    if use_vmap or "allow_is_bidirectional_skip" in kwargs:
        raise ValueError(f"{PACKED_ATTENTION} attention is causal per sequence only: this model asks for "
                         "a custom or bidirectional mask")
    return None if local_size is None else SlidingWindow(int(local_size))


class _Boundaries:
    """cu_seqlens (and longest length) of each row of the last position_ids seen: every layer of
    one forward (and a gradient-checkpointing recompute) gets the same tensor, so it is read once."""

    def __init__(self):
        self._key, self._version, self._value = None, None, None

    def __call__(self, position_ids: torch.Tensor | None, batch: int, length: int,
                 device) -> list[tuple[torch.Tensor, int]]:
        if position_ids is None:  # one sequence per row
            return [(torch.tensor([0, length], dtype=torch.int32, device=device), length)] * batch
        if self._key is not None and self._key() is position_ids and self._version == position_ids._version:
            return self._value
        rows = position_ids.expand(batch, -1)
        starts = torch.ones_like(rows, dtype=torch.bool)
        starts[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
        out = []
        for row in starts:
            end = torch.tensor([length], device=row.device)
            cu = torch.cat([row.nonzero().flatten(), end]).to(torch.int32)
            out.append((cu.to(device), int((cu[1:] - cu[:-1]).max())))
        self._key, self._version, self._value = weakref.ref(position_ids), position_ids._version, out
        return out


_boundaries = _Boundaries()


def _flash_varlen_available(query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None)


def _window(module: torch.nn.Module, mask: SlidingWindow | None, sliding_window: int | None) -> int | None:
    """The layer's window: the module's `sliding_window` argument (flash-attention contract) or the mask's."""
    window = mask.size if isinstance(mask, SlidingWindow) else None
    if sliding_window is None:
        return window
    if window is not None and window != sliding_window:
        raise ValueError(f"sliding window {sliding_window} of {type(module).__name__} disagrees with the "
                         f"mask's {window}")
    return int(sliding_window)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: SlidingWindow | None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, is_causal: bool | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` function of "mispo_packed" (transformers' contract): query
    [B, Hq, L, D], key / value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    name = type(module).__name__
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no dropout (got p = {dropout}): set the model "
                         "config's attention_dropout to 0 (log-prob ratios need one function in both passes)")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{PACKED_ATTENTION} attention supports no position biases ({name}); load the model with "
                         "another attn_implementation")
    sinks = kwargs.get("s_aux")  # gpt-oss: a learned sink logit per head
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise ValueError(f"{PACKED_ATTENTION} attention is causal only ({name} is not)")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{PACKED_ATTENTION} attention needs as many keys as queries (no KV cache)")
    window = _window(module, attention_mask, sliding_window)

    batch, _, length, _ = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D]
    rows = []
    for b, (cu, max_len) in enumerate(_boundaries(position_ids, batch, length, query.device)):
        if _flash_varlen_available(query) and not softcap and sinks is None:
            from flash_attn import flash_attn_varlen_func

            window_size = (-1, -1) if window is None else (window - 1, 0)  # keys i - (window - 1) .. i
            rows.append(flash_attn_varlen_func(q[b], k[b], v[b], cu, cu, max_len, max_len, causal=True,
                                               softmax_scale=scaling, window_size=window_size))
        else:
            rows.append(segment_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], cu, window, scaling, softcap,
                                          sinks)[0])
    return torch.stack(rows), None


def register() -> None:
    """Make "mispo_packed" a valid `attn_implementation` in this process (idempotent)."""
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)


def use_packed_attention(model) -> None:
    """Switch a transformers causal LM to per-sequence packed attention; refuses models whose
    attention does not dispatch through transformers' AttentionInterface or that use dropout."""
    register()
    name = type(model).__name__
    if getattr(model.config, "attention_dropout", 0.0):
        raise ValueError(f"{name} has attention_dropout = {model.config.attention_dropout}: the learner's "
                         "packed attention has no dropout; set it to 0 in the checkpoint's config.json")
    model.set_attn_implementation(PACKED_ATTENTION)
    if model.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(f"{name} does not dispatch attention through transformers' AttentionInterface, so "
                         "packed micro-batches would attend across sequences: the learner cannot train it")
