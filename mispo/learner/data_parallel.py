"""How data-parallel learner ranks share a batch: every rank receives the whole batch and computes,
from it alone, the same plan, so no rank has to ask another what it holds.

    micro = rank_share(samples, rank, world_size, max_tokens)   # this rank's micro-batches
    for mb in micro:                # the same number on every rank
        ...                         # mb.padding: run it, weight its loss 0

Contract of `rank_micro_batches` (the plan behind `rank_share`):
- rows are dealt to ranks by token count, longest first, each to the rank with the fewest tokens so far
  (ties: the lower rank): every row lands on exactly one rank, and the ranks' token counts differ by at
  most the longest row's length;
- each rank's rows are packed in order into micro-batches of at most max_tokens tokens (a longer row
  alone);
- every rank gets the same number k of micro-batches (the collectives inside forward and backward,
  ZeRO-3's parameter gathers and the gradient reduction, need the same count on every rank): a rank with
  fewer splits its largest multi-row micro-batch in two until it has k, and where no micro-batch can be
  split it appends padding micro-batches that repeat one row with weight 0.
"""

from __future__ import annotations

from mispo.batch import Sample
from mispo.learner.packing import PackedMicroBatch, _pack, pack_rows, sample_lengths


def deal_rows(lengths: list[int], rows: list[int], world_size: int) -> list[list[int]]:
    """Split `rows` over `world_size` ranks, balanced by `lengths[row]` (longest first, each to the
    lightest rank); each rank's rows keep the order they had in `rows`."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    position = {r: i for i, r in enumerate(rows)}
    load, shards = [0] * world_size, [[] for _ in range(world_size)]
    for r in sorted(rows, key=lambda r: (-lengths[r], position[r])):
        rank = min(range(world_size), key=lambda k: (load[k], k))
        shards[rank].append(r)
        load[rank] += lengths[r]
    return [sorted(s, key=position.__getitem__) for s in shards]


def rank_micro_batches(lengths: list[int], rows: list[int], world_size: int,
                       max_tokens: int) -> list[list[tuple[list[int], bool]]]:
    """Per rank, its micro-batches as (rows, padding); the same number on every rank."""
    if not rows:
        raise ValueError("rank_micro_batches needs at least one row")
    packed = [pack_rows(lengths, shard, max_tokens) for shard in deal_rows(lengths, rows, world_size)]
    k = max(len(groups) for groups in packed)
    plans = []
    for groups in packed:
        while len(groups) < k:
            splittable = [i for i, g in enumerate(groups) if len(g) > 1]
            if not splittable:
                break
            i = max(splittable, key=lambda j: sum(lengths[r] for r in groups[j]))
            g = groups[i]
            groups[i:i + 1] = [g[:len(g) // 2], g[len(g) // 2:]]
        filler = [groups[0][0]] if groups else [min(rows, key=lambda r: lengths[r])]
        plans.append([(g, False) for g in groups] + [(filler, True)] * (k - len(groups)))
    return plans


def rank_share(samples: list[Sample], rank: int, world_size: int, max_tokens: int) -> list[PackedMicroBatch]:
    """This rank's packed micro-batches of all the samples (on one rank: the usual packing)."""
    plan = rank_micro_batches(sample_lengths(samples), list(range(len(samples))), world_size, max_tokens)[rank]
    return [_pack(samples, group, padding) for group, padding in plan]


def merge_row_results(parts: list[dict]) -> dict:
    """Merge per-rank results whose rows are disjoint and zero elsewhere: tensors summed key by key."""
    return {key: sum(p[key] for p in parts) for key in parts[0]}
