"""Checkpoints as data: sync buckets read from disk, and the merge's architecture / tokenizer check."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mispo.weights.checkpoint_io import architecture_differences, check_interchangeable, read_buckets
from mispo.config import RecipeError
from mispo.models.step3p5.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two tiny checkpoints of one architecture (different weights) and one with a wider hidden size."""
    root = tmp_path_factory.mktemp("ckpts")
    return (write_tiny_checkpoint(root / "a", seed=0), write_tiny_checkpoint(root / "b", seed=1),
            write_tiny_checkpoint(root / "wide", seed=0, hidden_size=96))


def test_read_buckets_holds_every_tensor_once(twins):
    a = twins[0]
    expected = {k: v for f in a.glob("*.safetensors") for k, v in load_file(f).items()}
    buckets = read_buckets(a, bucket_bytes=64 << 10)
    assert len(buckets) > 1
    got = [kv for b in buckets for kv in b]
    assert sorted(k for k, _ in got) == sorted(expected)
    for name, tensor in got:
        assert torch.equal(tensor, expected[name])


def test_same_architecture_different_weights_is_interchangeable(twins):
    a, b, _ = twins
    assert architecture_differences(a, b) == []
    check_interchangeable(a, {"math": b}, field="merge.experts")


def test_a_different_architecture_is_named_with_the_field(twins):
    a, _, wide = twins
    diff = architecture_differences(a, wide)
    assert any(d.startswith("hidden_size: 64 vs 96") for d in diff)
    with pytest.raises(RecipeError, match=r"merge\.experts\.math = .*hidden_size: 64 vs 96.*fix"):
        check_interchangeable(a, {"math": wide}, field="merge.experts")


def test_a_different_tokenizer_is_named(tmp_path, twins):
    a = twins[0]
    other = write_tiny_checkpoint(tmp_path / "c", seed=0)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(RecipeError, match="tokenizer chat template"):
        check_interchangeable(a, {"tool": other}, field="merge.experts")


def test_missing_checkpoint_is_named(tmp_path, twins):
    with pytest.raises(RecipeError, match=r"merge\.experts\.math = .*nope.*no config\.json"):
        check_interchangeable(twins[0], {"math": tmp_path / "nope"}, field="merge.experts")
