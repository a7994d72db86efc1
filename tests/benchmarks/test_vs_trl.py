"""benchmarks/vs_trl.py end to end: the tiny config for 2 steps writes one row with both sides measured, TRL at the
fastest of the configurations swept."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_two_steps_writes_both_sides(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "vs_trl.json"
    subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--config", "tiny", "--steps", "2", "--output", str(out),
                    "--trl", "micro=64,gc=0", "--trl", "micro=16,gc=1"],
                   cwd=ROOT, check=True, timeout=1800)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["config"], row["dtype"], row["mode"], row["steps"]) == ("tiny", "float32", "sync", 2)
    most = row["prompts"] * row["samples"] * row["max_new_tokens"]
    for side in ("trl", "mispo"):
        s = row[side]
        assert len(s["steps"]) == 2
        assert s["s_per_step"] > 0 and s["tok_per_s"] > 0
        assert 0 < s["tokens_per_step"] <= most  # completion tokens, not padded or prompt tokens
        assert s["tok_per_s"] == pytest.approx(s["tokens_per_step"] / s["s_per_step"])
    assert row["ratio"] == pytest.approx(row["mispo"]["tok_per_s"] / row["trl"]["tok_per_s"])
    sweep = row["trl_sweep"]
    assert set(sweep) == {"micro=64,gc=0", "micro=16,gc=1"}
    assert row["trl"]["config"] == max(sweep, key=lambda k: sweep[k]["tok_per_s"])
    assert row["trl"]["tok_per_s"] == sweep[row["trl"]["config"]]["tok_per_s"]
