"""benchmarks/gpu_check.py: the release slice it trains, and its --small mode end to end on this machine.

--small runs every section's code at tiny sizes (on CPU here: the fused attention falls back to the
reference and must say so); a section that fails is reported and the next one still runs; without
transformers the kernel sections still run and the model sections say why they are skipped.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

ON_GPU = torch.cuda.is_available()


def run_small(tmp_path, *args, env=None):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--small", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_two_layer_config_is_the_release_cut_to_full_and_sliding_moe_layers():
    cfg = gpu_check.two_layer_config([0, 43], small=False, backend="fused")
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    assert [(s.num_heads, s.num_kv_heads, s.window) for s in map(cfg.attention_spec, range(2))] == \
        [(64, 8, None), (96, 8, 512)]
    assert cfg.moe_layer_ids == [1] and (cfg.moe_num_experts, cfg.moe_top_k) == (288, 8)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.vocab_size) == (4096, 1280, 128896)
    assert cfg.swiglu_limit(1, shared=False) == 7.0 and cfg.attention_spec(0).rotary_dim == 64
    assert cfg.num_nextn_predict_layers == 0 and (cfg.attn_backend, cfg.moe_backend) == ("fused", "fused")
    with pytest.raises(ValueError, match="--layers 0,45: release decoder layers are 0..44"):
        gpu_check.two_layer_config([0, 45], small=False, backend="fused")


@pytest.mark.slow
def test_small_run_reports_every_section(tmp_path):
    proc, report = run_small(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    sections = report["sections"]
    assert {k: v["status"] for k, v in sections.items()} == {k: "ok" for k in gpu_check.SECTIONS}, \
        {k: v.get("error") for k, v in sections.items()}

    bench = sections["bench"]
    rate = bench["matmul"]["tflops"]
    assert rate > 0 and set(bench["kernels"]["attention"]) == {"swa", "full", "packed_swa"}
    moe_rows = bench["kernels"]["moe"]
    assert {r["name"] for r in moe_rows} >= {"per-expert loop (torch_experts, reference)"}
    for r in moe_rows:
        assert r["fraction_of_measured_matmul"] == pytest.approx(r["tflops"] / rate)

    parity = sections["parity"]
    assert [a["fell_back_to_reference"] for a in parity["attention"]] == [not ON_GPU] * 3
    assert parity["moe"]["kernel"].startswith("gemm=") and parity["ok"]
    for case in parity["attention"] + [parity["moe"]]:
        # bf16 really ran (its rounding, 2^-8 relative, shows; fp32 against fp32 would differ by ~1e-7)
        assert all(1e-4 < t["rel_err_reference_bf16"] < 0.05 for t in case["tensors"])

    train = sections["train"]
    assert train["loss_finite"] and train["grad_norm_finite"] and len(train["steps"]) == 2
    assert train["steps"][-1]["loss"] != train["steps"][0]["loss"]  # the optimizer step moved the weights
    assert [d["attention"] for d in train["layers"]] == ["full_attention", "sliding_attention"]
    assert train["layers"][1]["ffn"].startswith("MoE") and train["expert_parameters"] > 0
    assert train["optimizer"]["name"] in gpu_check.OPTIMIZERS and train["step_s"] > 0
    assert train["backends"]["attention_fell_back_to_reference"] is (not ON_GPU)

    gap = sections["logprob_gap"]
    # every token but each document's last has a target in its document
    assert gap["tokens_scored"] == 256 - len(gpu_check.DOC_FRACTIONS)
    # the bf16 run really is bf16: its log-probs are off by bf16 rounding (~1e-3 here), not fp32's ~1e-7
    assert 5e-5 < gap["mean_abs"] <= gap["max_abs"] < 1.0 and math.isfinite(gap["mean_logprob_fp32"])

    head = sections["head"]  # the fused log-prob head against the logits path: same numbers, no [T, V] tensor
    assert head["ok"] and head["max_abs_logp"] < 1e-2 and head["vocab"] == 512
    if ON_GPU:
        assert head["fused head"]["peak_bytes"] < head["logits_bytes_bf16"] < head["logits (chunked)"]["peak_bytes"]

    tests = sections["pytest"]
    assert tests["failures"] == tests["errors"] == 0 and tests["tests"] > 0
    if not ON_GPU:
        assert tests["skipped"] == tests["tests"]

    text = proc.stdout
    assert "summary" in text and "JSON: " in text
    if not ON_GPU:
        assert "fell back to the reference" in text


@pytest.mark.slow
def test_a_failing_section_is_reported_and_the_next_one_runs(tmp_path):
    proc, report = run_small(tmp_path, "--sections", "train,parity", "--layers", "0,99")
    assert proc.returncode == 1
    train, parity = report["sections"]["train"], report["sections"]["parity"]
    assert train["status"] == "failed" and "--layers 0,99: release decoder layers are 0..44" in train["error"]
    assert parity["status"] == "ok" and parity["ok"]
    assert "ValueError: --layers 0,99" in proc.stdout and "not ok: train" in proc.stdout


@pytest.mark.slow
def test_without_transformers_the_kernel_sections_run_and_the_model_sections_say_why(tmp_path):
    shadow = tmp_path / "no_transformers"
    shadow.mkdir()
    # sys.modules[name] = None: every `import transformers` raises ImportError
    (shadow / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow}:{ROOT}"}
    proc, report = run_small(tmp_path, "--sections", "parity,train,pytest", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    sections = report["sections"]
    assert report["environment"]["has"]["transformers"] is False
    parity = sections["parity"]
    assert parity["status"] == "ok" and parity["ok"] and "without the package __init__" in parity["import"]
    for name in ("train", "pytest"):
        assert sections[name]["status"] == "skipped" and "transformers" in sections[name]["reason"]
