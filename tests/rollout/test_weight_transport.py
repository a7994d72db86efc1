"""The bucket format shared by the learners and the rollout engines (mispo.weights.transport)."""

from __future__ import annotations

import torch

from mispo.weights.transport import bucketize, pack, resolve, to_store


def test_bucketize_keeps_order_and_bounds_sizes():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32: 4 bytes each
    buckets = bucketize(named, bucket_bytes=80)
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert bucketize([], 80) == []


def test_store_layout_round_trip():
    bucket = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)), ("c", torch.tensor(2.5)),
              ("d", torch.randn(4, 6)[:, ::2])]  # non-contiguous
    for form in (to_store(bucket), pack(bucket), bucket):
        out = dict(resolve(form))
        assert sorted(out) == ["a", "b", "c", "d"]
        for name, x in bucket:
            assert x.dtype == out[name].dtype and x.shape == out[name].shape and torch.equal(x, out[name])
