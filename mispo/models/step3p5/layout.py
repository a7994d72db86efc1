"""`SequenceLayout`: where sequences start and end in a [B, T] batch (plain, padded or packed).

Built once per forward by the model and handed to every attention backend (contract in `backends.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceLayout:
    """Where sequences start and end in a [B, T] batch, computed once per forward.

    position_ids [B, T]: position within its own sequence.
    segment_ids  [B, T] or None: packed batches; tokens attend only within their segment.
    attention_mask [B, T] or None: 1 for real tokens, 0 for padding.
    cu_seqlens [S+1] int32 or None: packed B == 1 batches, boundaries for varlen kernels.
    """

    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    @classmethod
    def build(cls, input_shape: tuple[int, int], device: torch.device,
              attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> "SequenceLayout":
        """Derive the layout. Packed batches are marked by position_ids that restart at 0."""
        batch, length = input_shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(length, device=device).expand(batch, length)
            return cls(position_ids=position_ids, attention_mask=attention_mask)
        starts = position_ids == 0
        starts[:, 0] = True
        n_starts = starts.sum(-1)
        if attention_mask is None and bool((n_starts > 1).any()):
            segment_ids = starts.long().cumsum(-1)
            layout = cls(position_ids=position_ids, segment_ids=segment_ids)
            if batch == 1:
                bounds = torch.nonzero(starts[0]).flatten()
                cu = torch.cat([bounds, torch.tensor([length], device=device)]).to(torch.int32)
                layout.cu_seqlens = cu
                layout.max_seqlen = int((cu[1:] - cu[:-1]).max())
            return layout
        return cls(position_ids=position_ids, attention_mask=attention_mask)
