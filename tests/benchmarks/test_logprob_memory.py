"""benchmarks/logprob_memory.py: the plan's logits formula (`mispo.plan.memory.logits_bytes`) against the
measured peak of a small case (each variant in a fresh process), and the script end to end at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import logprob_memory as bench  # noqa: E402
from mispo.plan.memory import head_logprob_bytes, logits_bytes  # noqa: E402

# V = 8192, T = 4096, chunk 128, bf16: logits T V b = 64 MiB, one fp32 chunk 4 MiB
T, V, H, C = 4096, 8192, 256, 128


def test_formulas_bound_the_chunked_and_fused_paths_and_not_the_naive_one():
    got = {v: bench.measure(v, T, V, H, "bfloat16", C, threads=1) for v in bench.VARIANTS}
    lm_head_grads = (T + V) * H * 2
    bound = logits_bytes(T, V, 2, C) + lm_head_grads
    for variant in ("chunked", "learner"):
        # within the logits, their gradient and 2.25 fp32 chunks (+ the lm-head's gradients)
        assert 2 * T * V * 2 < got[variant]["peak_bytes"] <= bound, variant
    # the learner's [1, T, V] -> [T, V] view costs no second full gradient (which would need 3 T V b)
    assert got["learner"]["peak_bytes"] < 3 * T * V * 2
    # the naive path holds fp32 [T, V] copies: far above what the plan charges
    assert got["full"]["peak_bytes"] > bound + 2 * T * V * 4
    # the fused head holds no [T, V] tensor: within its chunk's transients, the lm-head's gradients and one
    # weight-sized workspace (CPU's bf16 matmul reorders W per call), far below the logits alone
    fused = bench.measure("fused", T, V, H, "bfloat16", C, threads=1)
    assert 0 < fused["peak_bytes"] <= head_logprob_bytes(T, V, C) + lm_head_grads + V * H * 2 < T * V * 2


def test_script_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/logprob_memory.py"), "--vocab", "2048", "--tokens",
                          "512", "--hidden", "8", "--chunk", "64", "--threads", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == list(bench.VARIANTS) and {r["tokens"] for r in rows} == {512}
    for r in rows:
        assert r["peak_bytes"] > 0 and r["ratio_vs_full"] > 0
        assert (r["predicted_bytes"] is None) == (r["variant"] == "full")
    assert "peak MiB" in run.stdout and "predicted" in run.stdout and "chunks" in run.stdout
