"""benchmarks/kernels.py runs end to end at tiny sizes on whatever device this is (its --small mode)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_small_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.json"
    assert bench.main(["--small", "--iters", "1", "--warmup", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {r["name"] for r in results["moe"]} >= {"per-expert loop (torch_experts, reference)"}
    assert all(r["ms"] > 0 for rows in results["attention"].values() for r in rows)
    text = capsys.readouterr().out
    assert "MoE layer fwd+bwd" in text and "sliding window" in text
