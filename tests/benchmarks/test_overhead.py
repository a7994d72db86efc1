"""benchmarks/overhead.py end to end at the tiny config: mispo's step against the limit measured in the same run
(a bare vLLM engine generating the same requests, a bare forward + backward + AdamW step of the same tokens)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_sync_writes_the_limit_and_the_ratio(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, "benchmarks/overhead.py", "--config", "tiny", "--modes", "sync", "--steps", "2",
                    "--repeats", "1", "--json", str(out)], cwd=ROOT, check=True, timeout=1200)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["config"], row["mode"], row["goal"]) == ("tiny", "sync", 1.15)
    assert row["generation_s"] > 0 and row["update_s"] > 0 and row["mispo_s_per_step"] > 0
    assert row["limit_s"] == pytest.approx(row["generation_s"] + row["update_s"])  # sync: one after the other
    assert row["ratio"] == pytest.approx(row["mispo_s_per_step"] / row["limit_s"])
    # the bare engine generated the run's requests: 8 prompts x 8 samples of at most 16 tokens each
    assert 0 < row["response_len"] <= 16
    assert row["raw_generation_tokens"] == 8 * 8 * round(row["response_len"])  # the run's tokens, exactly
    assert row["prompt_len"] > 5
