"""Weight buckets between the learners and the rollout engines: the format both sides share.

    buckets = bucketize(state_dict.items(), 256 << 20)   # learner: release-named tensors, size-bounded
    refs = [put_bucket(b) for b in buckets]               # into the Ray object store, zero-copy layout
    weights = resolve(ref)                                # engine side: back to [(name, tensor)]
    blob = pack(weights)                                  # safetensors bytes for vLLM's multiprocess RPC
    meta, flat = flatten(bucket)                          # one flat uint8 tensor, for mispo.weights.broadcast
    weights = unflatten(meta, received_flat)              # views into it, in the bucket's order

A bucket is a list of (release name, tensor). On its way it may take three other forms, all of which
`resolve` accepts: the object-store layout (`to_store`: numpy byte views, which Ray stores out of band),
`pack`ed safetensors bytes, or a Ray ObjectRef to either of them or to a plain list. For a broadcast
it travels as `flatten`'s (metadata, one flat uint8 tensor); metadata is JSON-able, [name, dtype, shape].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

Bucket = list[tuple[str, torch.Tensor]]


def bucketize(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[Bucket]:
    """(name, tensor) pairs in order, cut into buckets of about `bucket_bytes` (a bucket closes once it
    reaches the size, so one large tensor makes a bucket of its own)."""
    buckets, current, size = [], [], 0
    for name, tensor in named:
        current.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def to_store(bucket: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple, Any]]:
    """A bucket in the object-store layout: (name, dtype, shape, flat uint8 numpy view of the bytes).

    Ray stores numpy arrays out of band, so `ray.put` is one memcpy into shared memory and `ray.get`
    maps them without copying; torch tensors are pickled instead, a copy on both ends (about 10x
    slower for a 256 MiB bucket here)."""
    out = []
    for name, t in bucket:
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()  # a view: no copy
        out.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), data))
    return out


def put_bucket(bucket: Iterable[tuple[str, torch.Tensor]]):
    """`ray.put` of a bucket in the object-store layout (`to_store`); the ref goes to a weight sync."""
    import ray

    return ray.put(to_store(bucket))


def resolve(bucket: Any) -> Bucket:
    """A bucket as a list of (name, tensor), from: such a list, the `to_store` layout, `pack`ed bytes,
    or a Ray ObjectRef to any of these (tensors from the store layout are read-only shared memory)."""
    if type(bucket).__name__ == "ObjectRef":
        import ray

        bucket = ray.get(bucket)
    if isinstance(bucket, (bytes, bytearray, memoryview)):
        from safetensors.torch import load

        return list(load(bytes(bucket)).items())
    out = []
    for item in bucket:
        if len(item) == 4:  # to_store layout
            name, dtype, shape, data = item
            with warnings.catch_warnings():  # read-only shared memory: we only ever copy from it
                warnings.simplefilter("ignore", UserWarning)
                item = (name, torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape))
        out.append(tuple(item))
    return out


def pack(bucket: Bucket) -> bytes:
    """A bucket as safetensors bytes, for vLLM's multiprocess RPC (its engine process cannot
    re-pickle the zero-copy tensors it decodes, so tensors do not survive the hop to the worker)."""
    from safetensors.torch import save

    return save({name: t.detach().contiguous().clone() for name, t in bucket})  # clone: no shared storage


ALIGN = 16  # bytes: each tensor of a flat bucket starts at a multiple (a dtype view needs its size to divide it)


def layout(meta: list) -> tuple[list[int], int]:
    """Byte offsets of `meta`'s tensors in a flat bucket and its total size: tensor i takes
    numel_i * itemsize_i bytes from offset_i, each offset rounded up to a multiple of ALIGN."""
    offsets, end = [], 0
    for _, dtype, shape in meta:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + math.prod(shape) * getattr(torch, dtype).itemsize
    return offsets, end


def flatten(bucket: Iterable[tuple[str, torch.Tensor]]) -> tuple[list, torch.Tensor]:
    """A bucket as (metadata [[name, dtype, shape], ...], one flat uint8 tensor of `layout(meta)`'s size on
    the bucket's device): the form a broadcast sends (one copy of the bytes)."""
    bucket = [(name, t.detach()) for name, t in bucket]
    meta = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in bucket]
    offsets, total = layout(meta)
    device = bucket[0][1].device if bucket else torch.device("cpu")
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    for (_, t), start in zip(bucket, offsets):
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        flat[start:start + raw.numel()].copy_(raw)
    return meta, flat


def unflatten(meta: list, flat: torch.Tensor) -> Bucket:
    """`flatten`'s inverse: (name, tensor) views into `flat` (no copy), in the bucket's order."""
    offsets, total = layout(meta)
    if flat.dtype != torch.uint8 or flat.numel() != total:
        raise ValueError(f"flat bucket of {flat.numel()} {flat.dtype} elements; its metadata needs "
                         f"{total} uint8")
    out = []
    for (name, dtype, shape), start in zip(meta, offsets):
        dt = getattr(torch, dtype)
        out.append((name, flat[start:start + math.prod(shape) * dt.itemsize].view(dt).reshape(shape)))
    return out
