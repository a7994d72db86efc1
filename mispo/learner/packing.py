"""Padding-free packing: several prompt+response sequences in one row, position ids restarting at 0.

Logits at packed position p predict the token at p + 1, so response token t of a sequence that
starts at offset s with a prompt of P tokens is predicted at s + P + t - 1, and the state before it,
s_t, is read there too (values). V(s_T) after the last token is read at s + P + T - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mispo.algorithms.logits import LOGITS_CHUNK, logprobs_and_entropy, logprobs_from_logits
from mispo.batch import Sample
from mispo.families import replay_routing
from mispo.learner.logprob_head import fused_head, head_computes_logprobs


@dataclass
class PackedMicroBatch:
    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    rows: list[int]  # batch row of each packed sequence
    starts: list[int]  # offset of each sequence in the packed row
    prompt_lens: list[int]
    response_lens: list[int]
    padding: bool = False  # a data-parallel filler: run it (collectives need it), weight its loss 0
    routed_experts: torch.Tensor | None = None  # routing replay: [L, layers, K] expert ids, -1 = route freely

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def sample_lengths(samples: list[Sample]) -> list[int]:
    """Prompt + response tokens of each sample."""
    return [len(s.prompt_ids) + len(s.response_ids) for s in samples]


def pack_rows(lengths: list[int], rows: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy in-order grouping of rows into groups of at most max_tokens tokens (a longer row alone)."""
    groups, current, used = [], [], 0
    for r in rows:
        if current and used + lengths[r] > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(r)
        used += lengths[r]
    if current:
        groups.append(current)
    return groups


def pack_samples(samples: list[Sample], rows: list[int], max_tokens: int) -> list[PackedMicroBatch]:
    """Greedy packing of the given rows, in order, into micro-batches of at most max_tokens tokens
    (a sequence longer than max_tokens gets a micro-batch of its own)."""
    return [_pack(samples, group) for group in pack_rows(sample_lengths(samples), rows, max_tokens)]


def _pack(samples: list[Sample], rows: list[int], padding: bool = False) -> PackedMicroBatch:
    ids, pos, starts, plens, rlens = [], [], [], [], []
    for r in rows:
        s = samples[r]
        if not s.prompt_ids:  # its first response token would be scored after the previous sequence's tokens
            raise ValueError(f"sample {r} has an empty prompt: the first response token has no context to be "
                             "scored in; fix: give every row a non-empty prompt (or a chat template / BOS token)")
        seq = list(s.prompt_ids) + list(s.response_ids)
        starts.append(len(ids))
        plens.append(len(s.prompt_ids))
        rlens.append(len(s.response_ids))
        ids.extend(seq)
        pos.extend(range(len(seq)))
    return PackedMicroBatch(torch.tensor([ids]), torch.tensor([pos]), rows, starts, plens, rlens, padding,
                            _packed_routing([samples[r] for r in rows]))


def routed_rows(routed, length: int, num_layers: int, top_k: int) -> torch.Tensor:
    """One sequence's record as [length, num_layers, K] int16, padded with -1 past the record's end.
    A record longer than the sequence, or of another layer count or K, is an error."""
    rec = torch.as_tensor(np.asarray(routed)).to(torch.int16)
    if rec.dim() != 3 or rec.shape[1:] != (num_layers, top_k) or rec.shape[0] > length:
        raise ValueError(f"routed experts of shape {tuple(rec.shape)} do not fit a sequence of {length} tokens of a "
                         f"model with {num_layers} layers and top-{top_k} routing ([<= {length}, {num_layers}, "
                         f"{top_k}] expected)")
    out = torch.full((length, num_layers, top_k), -1, dtype=torch.int16)
    out[: rec.shape[0]] = rec
    return out


def _packed_routing(samples: list[Sample]) -> torch.Tensor | None:
    """The samples' routing records end to end ([L, layers, K]; None when no sample carries one)."""
    records = [s.routed_experts for s in samples]
    first = next((r for r in records if r is not None), None)
    if first is None:
        return None
    _, layers, k = first.shape
    return torch.cat([routed_rows(r if r is not None else torch.empty(0, layers, k), len(s.prompt_ids) +
                                  len(s.response_ids), layers, k) for s, r in zip(samples, records)])


def response_positions(mb: PackedMicroBatch) -> list[torch.Tensor]:
    """Per packed sequence, the packed positions whose outputs predict its response tokens."""
    return [torch.arange(s + p - 1, s + p - 1 + n) for s, p, n in zip(mb.starts, mb.prompt_lens, mb.response_lens)]


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = LOGITS_CHUNK) -> torch.Tensor:
    """[1, L] log p(input_ids[p + 1] | prefix) at every p (the last position gets 0), in fp32, with
    p = softmax(logits / temperature). Chunked over positions (`mispo.algorithms.logits`): no fp32
    [L, vocab] copy exists, in the forward or the backward."""
    return token_logprobs_and_entropy(logits, input_ids, temperature, chunk_size, with_entropy=False)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                               chunk_size: int = LOGITS_CHUNK, with_entropy: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` and, in the same pass over the vocabulary, the [1, L] entropy of the
    distribution at every position but the last (0 there); None without `with_entropy`."""
    # All L positions, the last with a stand-in label and its outputs replaced by 0 below: reading
    # logits[0, :-1] would make autograd pad that slice's gradient back to [1, L, V], a second gradient
    # of the whole logits for a moment; this way the chunked backward writes the only one.
    # (logits[0] would too: select's backward also allocates; a view's backward is a view.)
    if logits.shape[0] != 1:
        raise ValueError(f"packed logits are [1, L, V], got {tuple(logits.shape)}")
    rows = logits.reshape(-1, logits.shape[-1])  # [1, L, V] -> [L, V], a view
    labels = torch.cat([input_ids[0, 1:], input_ids.new_zeros(1)])
    if with_entropy:
        lp, ent = logprobs_and_entropy(rows, labels, chunk_size, temperature)
    else:
        lp, ent = logprobs_from_logits(rows, labels, chunk_size, temperature), None
    pad = lp.new_zeros(1)
    return torch.cat([lp[:-1], pad])[None], (None if ent is None else torch.cat([ent[:-1], pad])[None])


def forward_logprobs(model, mb: PackedMicroBatch, device=None, temperature: float = 1.0,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's forward on a packed micro-batch -> ([1, L] log p(next token), [1, L] entropy or None),
    fp32, 0 at the last position, with p = softmax(logits / temperature) and the samples' routing replayed
    (R3) when they carry it. Through the fused head (`logprob_head.py`: no [L, vocab] tensor, forward or
    backward) when the model allows it; from the logits, chunked, otherwise."""
    ids, pos = mb.input_ids.to(device), mb.position_ids.to(device)
    head = fused_head(model)
    with replay_routing(model, mb.routed_experts):
        if head is None:
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            return token_logprobs_and_entropy(logits, ids, temperature, with_entropy=with_entropy)
        labels = torch.cat([ids[0, 1:], ids.new_zeros(1)])[None]
        with head_computes_logprobs(head, labels, temperature, with_entropy):
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # [1, L, 1 or 2]
    last = torch.ones_like(out[..., 0])
    last[0, -1] = 0.0
    return out[..., 0] * last, (out[..., 1] * last if with_entropy else None)


def gather_response(per_position: torch.Tensor, mb: PackedMicroBatch, length: int) -> torch.Tensor:
    """[len(mb.rows), length] response-aligned values of this micro-batch (zeros past each response)."""
    out = per_position.new_zeros(len(mb.rows), length)
    for i, positions in enumerate(response_positions(mb)):
        out[i, : positions.numel()] = per_position[0, positions]
    return out


def last_positions(mb: PackedMicroBatch) -> torch.Tensor:
    """Packed position of each sequence's last token (where V(s_T) is read)."""
    return torch.tensor([s + p + n - 1 for s, p, n in zip(mb.starts, mb.prompt_lens, mb.response_lens)])


@torch.no_grad()
def response_logprobs(model, samples: list[Sample], max_tokens: int, device=None,
                      micro: list[PackedMicroBatch] | None = None, temperature: float = 1.0) -> torch.Tensor:
    """[B, T] log p(response token | prefix) of every sample under softmax(`model`'s logits / temperature)
    (T = longest response; zeros past each response), fp32 on CPU; sequences packed into micro-batches
    of at most `max_tokens`. With `micro` (one data-parallel rank's share) only those micro-batches run,
    and only their non-padding rows are filled: the other rows stay 0."""
    length = max(max(len(s.response_ids) for s in samples), 1)
    out = torch.zeros(len(samples), length)
    for mb in micro if micro is not None else pack_samples(samples, list(range(len(samples))), max_tokens):
        logp, _ = forward_logprobs(model, mb, device, temperature)
        if not mb.padding:
            out[mb.rows] = gather_response(logp, mb, length).cpu()
    return out
