"""Speed of Step3p5's fused training kernels against their baselines: same device, same run.

    python benchmarks/kernels.py                 # full size, on a GPU (bf16)
    python benchmarks/kernels.py --small         # tiny sizes; runs on CPU too (checks the script works)
    python benchmarks/kernels.py --only moe --json results.json

Attention (fwd + bwd, 8k tokens, head_dim 128, 8 KV heads):
    sliding-window layer (96 q heads, W = 512): fused (flash / flex) vs SDPA with an explicit window mask
        (the reference backend)                                     goal: >= 3x, and far less memory
    full-causal layer (64 q heads): fused vs SDPA is_causal (torch's flash kernel) and FlashAttention
    packed batch (4 documents, W = 512): fused vs the reference
MoE layer (fwd + bwd, 8k tokens, 288 experts, top-8, hidden 4096, moe_intermediate 1280):
    fused (grouped GEMMs) vs the per-expert loop (`torch_experts`)   goal: >= 5x
    TFLOP/s of the fused layer (9 GEMMs: 3 forward, 6 backward) as a fraction of the device's dense
    bf16 peak                                                        goal: >= 40% (H100 SXM: 989 TFLOP/s)

Times are medians over --iters runs after warm-up (compiles and autotuning excluded, reported apart);
"peak MiB" is the most memory the step allocated above what was allocated before it (CUDA only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mispo.models.step3p5.kernels import attention as fused_attn  # noqa: E402
from mispo.models.step3p5.kernels import moe as fused_moe  # noqa: E402
from mispo.models.step3p5.layout import SequenceLayout  # noqa: E402
from mispo.models.step3p5.reference_ops import torch_attention, torch_experts  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
PEAKS = [("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
         ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0)]


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS:
        if key in name:
            return peak
    return None


@contextlib.contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, iters: int, warmup: int) -> dict:
    """Median ms of fn() (warm-up excluded), warm-up seconds, and peak extra memory of one call."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm_s = time.perf_counter() - t0
    peak_mib = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "warmup_s": warm_s, "peak_mib": peak_mib}


def fwd_bwd(fn, inputs, probe=None):
    """A closure running fn(*inputs) forward and backward, clearing the input grads first."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        (out if probe is None else out * probe).float().sum().backward()

    return step


def report(title: str, rows: list[dict], baseline: str):
    base = next((r for r in rows if r["name"] == baseline), None)  # None: the baseline failed (OOM?)
    print(f"\n{title}")
    print(f"  {'':48s} {'ms':>9s} {'speedup':>8s} {'peak MiB':>9s} {'warm-up s':>9s}")
    for r in rows:
        r["speedup_vs_baseline"] = None if base is None else base["ms"] / r["ms"]
        speedup = "n/a" if base is None else f"{r['speedup_vs_baseline']:.2f}x"
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        extra = f"  {r['note']}" if r.get("note") else ""
        print(f"  {r['name']:48s} {r['ms']:9.3f} {speedup:>8s} {mem:>9s} {r['warmup_s']:9.1f}{extra}")


# ---------------------------------------------------------------------- attention
def bench_attention(args, device, dtype) -> dict:
    if args.small:
        length, window, hq_swa, hq_full, hkv, d = 256, 32, 4, 2, 2, 32
    else:
        length, window, hq_swa, hq_full, hkv, d = args.tokens, args.window, 96, 64, 8, 128
    gen = torch.Generator(device="cpu").manual_seed(0)
    scale = d ** -0.5

    def qkv(hq):
        return [torch.randn(1, length, h, d, generator=gen).to(device, dtype).requires_grad_()
                for h in (hq, hkv, hkv)]

    plain = SequenceLayout.build((1, length), device)
    docs = 4
    doc_len = length // docs
    pos = torch.cat([torch.arange(doc_len)] * (docs - 1) + [torch.arange(length - (docs - 1) * doc_len)])
    packed = SequenceLayout.build((1, length), device, position_ids=pos[None].to(device))
    on_gpu = device.type == "cuda"
    impl = fused_attn.choose_impl(torch.empty(1, 1, 1, d, device=device, dtype=dtype), plain)
    results = {}

    def rows_for(layout, w, hq, with_sdpa_causal):
        q, k, v = qkv(hq)
        probe = torch.randn(1, length, hq, d, generator=gen).to(device, dtype)
        def fused():
            return fused_attn.fused_attention(q, k, v, layout, w, scale)

        cases = [(f"fused ({impl})", fused, None)]
        if on_gpu and fused_attn.HAS_FLEX and impl != "flex":
            cases.append(("flex (compiled)", fused, "flex"))
        if on_gpu and fused_attn.HAS_FLASH and impl != "flash":
            cases.append(("flash_attn", fused, "flash"))
        if with_sdpa_causal:
            cases.append(("SDPA is_causal (torch flash kernel)", lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
                enable_gqa=True).transpose(1, 2), None))
        cases.append(("SDPA + explicit mask (reference backend)",
                      lambda: torch_attention(q, k, v, layout, w, scale), None))
        rows = []
        for name, fn, forced in cases:
            with env("MISPO_STEP3P5_ATTN", forced):
                try:
                    r = measure(fwd_bwd(fn, (q, k, v), probe), device, args.iters, args.warmup)
                except Exception as exc:  # report and go on: one unavailable kernel must not hide the rest
                    print(f"  ({name} failed: {type(exc).__name__}: {str(exc)[:200]})")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
            rows.append({"name": name, **r})
        return rows

    title = f"attention fwd+bwd, {length} tokens, head_dim {d}, {hkv} KV heads, {str(dtype).split('.')[-1]}"
    if not on_gpu:
        title += "  [CPU: the fused backend falls back to the reference here]"
    rows = rows_for(plain, window, hq_swa, False)
    report(f"{title}\n  sliding window W={window}, {hq_swa} q heads", rows,
           "SDPA + explicit mask (reference backend)")
    results["swa"] = rows
    rows = rows_for(plain, None, hq_full, True)
    report(f"  full causal, {hq_full} q heads", rows, "SDPA + explicit mask (reference backend)")
    results["full"] = rows
    rows = rows_for(packed, window, hq_swa, False)
    report(f"  packed batch ({docs} documents), W={window}, {hq_swa} q heads", rows,
           "SDPA + explicit mask (reference backend)")
    results["packed_swa"] = rows
    return results


# ---------------------------------------------------------------------- MoE
def bench_moe(args, device, dtype) -> dict:
    if args.small:
        tokens, top_k, experts, hidden, inter = 64, 2, 8, 64, 32
    else:
        tokens, top_k, experts, hidden, inter = args.tokens, 8, 288, 4096, 1280
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    scores = torch.sigmoid(logits)
    ids = torch.topk(scores, top_k, dim=-1).indices
    tw = scores.gather(-1, ids)
    tw = (tw / tw.sum(-1, keepdim=True) * 3.0).requires_grad_()
    weights = [(torch.randn(experts, inter, hidden, generator=gen) * hidden ** -0.5).to(device, dtype),
               (torch.randn(experts, inter, hidden, generator=gen) * hidden ** -0.5).to(device, dtype),
               (torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5).to(device, dtype)]
    weights = [w.requires_grad_() for w in weights]
    limit = 7.0
    inputs = (x, tw, *weights)
    auto = fused_moe.pick_gemm(x, weights[0])
    cases = [(f"fused (gemm={auto})", lambda: fused_moe.fused_experts(x, ids, tw, *weights, limit))]
    if auto != "triton" and fused_moe.tk.usable(x):
        cases.append(("fused (gemm=triton)", lambda: fused_moe.fused_experts(x, ids, tw, *weights, limit,
                                                                             gemm="triton")))
    cases.append(("per-expert loop (torch_experts, reference)",
                  lambda: torch_experts(x, ids, tw, *weights, limit)))
    flops = 9 * 2 * tokens * top_k * hidden * inter  # 3 GEMMs forward, 6 backward
    peak = args.peak_tflops or device_peak_tflops(device)
    rows = []
    for name, fn in cases:
        try:
            r = measure(fwd_bwd(fn, inputs), device, args.iters, args.warmup)
        except Exception as exc:
            print(f"  ({name} failed: {type(exc).__name__}: {str(exc)[:200]})")
            continue
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        r["fraction_of_peak"] = None if peak is None else r["tflops"] / peak
        frac = "" if peak is None else f", {100 * r['fraction_of_peak']:.1f}% of {peak:.0f} peak"
        rows.append({"name": name, **r, "note": f"{r['tflops']:.1f} TFLOP/s{frac}"})
    with torch.no_grad():
        fwd = measure(lambda: fused_moe.fused_experts(x, ids, tw, *weights, limit), device, args.iters, 1)
    report(f"MoE layer fwd+bwd: {tokens} tokens, {experts} experts, top-{top_k}, hidden {hidden}, "
           f"moe_intermediate {inter}, SwiGLU clamp {limit}, {str(dtype).split('.')[-1]}"
           f"  ({flops / 1e12:.2f} TFLOP per step; fused forward alone {fwd['ms']:.3f} ms)",
           rows, "per-expert loop (torch_experts, reference)")
    return {"moe": rows, "moe_fused_forward_ms": fwd["ms"], "peak_tflops": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes (runs on CPU; checks the script)")
    parser.add_argument("--only", choices=["attention", "moe"], help="run one of the two benchmarks")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 10, 2 with --small)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs first (default 3; 2 with --small)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.iters = args.iters or (2 if args.small else 10)
    args.warmup = args.warmup or (2 if args.small else 3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.small:
        print("no CUDA device: the full-size benchmark needs a GPU (use --small to check the script on CPU)")
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; flash_attn: {fused_attn.HAS_FLASH}; "
          f"flex_attention: {fused_attn.HAS_FLEX}")
    results = {"device": name, "torch": torch.__version__, "small": args.small}
    if args.only in (None, "attention"):
        results["attention"] = bench_attention(args, device, dtype)
    if args.only in (None, "moe"):
        results.update(bench_moe(args, device, dtype))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
