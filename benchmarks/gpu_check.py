"""One prepared GPU check of Step3p5's training path, for the minutes a GPU is lent (H100 / H200).

    bash benchmarks/gpu_check.sh                      # on the GPU machine; JSON to $OUT/gpu_check.json
    python benchmarks/gpu_check.py --small            # tiny sizes on CPU: checks the script (CI)
    python benchmarks/gpu_check.py --sections train,logprob_gap --layers 0,43 --tokens 8192

Sections, in this order, each in its own subprocess (a crash, CUDA fault or OOM ends only that one),
each with a time cap that --budget-s bounds while keeping a minimum for the sections after it; the JSON
is rewritten after every section, so a run cut short keeps what it measured:

  bench        the device's measured dense bf16 matmul rate (8192^3, median) and benchmarks/kernels.py
               (attention 8k tokens W=512 vs SDPA + mask; MoE 288 experts top-8 vs the per-expert loop);
               the MoE layer's TFLOP/s as a share of the table peak and of the measured rate
  parity       fused vs plain-torch reference (reference_ops), forward and gradients, attention and MoE,
               each judged against an fp32 oracle on the same bf16 inputs: ok when, per tensor,
               rel_err(fused) <= 1.5 * rel_err(bf16 reference) + 2e-3   (rel_err = |a - o| / |o|)
  train        2-layer full-width Step3p5 (release layers 0 and 43 by default: full attention + dense MLP,
               sliding window 512 + 288-expert MoE with SwiGLU clamp 7), attn/moe backend "fused", bf16
               weights; one warm-up step (compiles) then --steps timed steps of forward, backward and
               optimizer step: step time, peak memory, loss and gradient norm finite
  logprob_gap  the same model's per-token log p(next token), same weights, same tokens:
               |log p_bf16 - log p_fp32| mean and max (bf16: fused backends as trained; also bf16 with
               the torch backends; fp32: torch backends, TF32 off)
  pytest       tests/kernels/ marker `gpu` (fused vs reference on the GPU), when pytest and transformers
               import; gets the time the others leave

Nothing is installed and nothing needs the network. Without transformers the model cannot be built:
train, logprob_gap and pytest are skipped, and bench / parity import the kernels without the package's
__init__ (which needs transformers only to register the Auto classes). On CPU (--small) the fused
attention falls back to the reference and the Triton kernels are unused; the output says so.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RELEASE_CONFIG = ROOT / "mispo" / "models" / "step3p5" / "configs" / "step3p5_flash.json"
SECTIONS = ("bench", "parity", "train", "logprob_gap", "head", "pytest")
NEEDS_MODEL = ("train", "logprob_gap", "head", "pytest")
# seconds per section: (cap, minimum kept for it while earlier ones run); full size (H100/H200), --small
CAPS = {"bench": (240, 60), "parity": (150, 45), "train": (180, 90), "logprob_gap": (150, 60),
        "head": (90, 30), "pytest": (180, 0)}
SMALL_CAPS = {"bench": (180, 30), "parity": (120, 20), "train": (120, 20), "logprob_gap": (120, 20),
              "head": (60, 10), "pytest": (180, 0)}
OPTIONAL = ("triton", "flash_attn", "transformers", "safetensors", "tokenizers", "pydantic", "pytest",
            "vllm", "ray", "deepspeed")
ENV_VARS = ("MISPO_STEP3P5_ATTN", "MISPO_STEP3P5_GEMM", "TRITON_INTERPRET", "PYTORCH_CUDA_ALLOC_CONF",
            "CUDA_VISIBLE_DEVICES")
# --small: the same code at tiny widths (the release's structure: 2 KV groups, more heads in SWA layers)
SMALL_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_attention_groups=2,
                   head_dim=32, attention_other_setting={"attention_type": "sliding_attention",
                                                         "num_attention_heads": 6, "num_attention_groups": 2,
                                                         "head_dim": 32},
                   vocab_size=512, moe_num_experts=8, moe_top_k=2, moe_intermediate_size=32,
                   share_expert_dim=32, sliding_window=16)
# the packed micro-batch: 4 documents (8k tokens: 3072, 2048, 2048, 1024)
DOC_FRACTIONS = (0.375, 0.25, 0.25, 0.125)


# ====================================================================== shared helpers
def importable(name: str, load: bool = True) -> tuple[bool, str]:
    """(imports, version or the import error); load=False only looks the module up (vllm, ray, ...: slow)."""
    try:
        if load:
            module = importlib.import_module(name)
        elif importlib.util.find_spec(name) is None:
            return False, "not installed"
        else:
            module = None
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"{type(exc).__name__}: {str(exc)[:120]}"
    try:
        from importlib.metadata import version
        return True, version(name.replace("_", "-"))
    except Exception:
        return True, str(getattr(module, "__version__", "installed"))


def import_step3p5_ops():
    """Import `mispo.models.step3p5`; without transformers, register the package without running its
    __init__ (Auto-class registration) so that kernels/, backends, reference_ops and layout import.
    Returns a note saying which happened."""
    try:
        importlib.import_module("mispo.models.step3p5")
        return "package"
    except ImportError as exc:
        if importable("transformers")[0]:
            raise
        reason = str(exc)
    importlib.import_module("mispo.models")  # plain packages, no dependencies
    spec = importlib.machinery.ModuleSpec("mispo.models.step3p5", None, is_package=True)
    spec.submodule_search_locations = [str(RELEASE_CONFIG.parents[1])]
    sys.modules["mispo.models.step3p5"] = importlib.util.module_from_spec(spec)
    return f"without the package __init__ ({reason})"


def device_of(args):
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def print_table(title: str, header: list[str], rows: list[list], align: str = "l"):
    """align: one 'l' / 'r' per column; columns past its end are right-aligned (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    left = lambda i: i < len(align) and align[i] == "l"  # noqa: E731
    line = lambda cells: ("  " + "  ".join(str(c).ljust(w) if left(i) else str(c).rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths)))).rstrip()
    print(f"\n{title}")
    print(line(header))
    for r in rows:
        print(line(r))


def fmt(x, spec=".3g"):
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def doc_lengths(tokens: int) -> list[int]:
    lens = [int(tokens * f) for f in DOC_FRACTIONS[:-1]]
    return lens + [tokens - sum(lens)]


def packed_positions(tokens: int, device):
    import torch
    return torch.cat([torch.arange(n) for n in doc_lengths(tokens)])[None].to(device)


# ====================================================================== section: bench
def load_kernels_benchmark():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_matmul(kernels, device, small: bool, n: int) -> dict:
    """Median time of one n x n x n matmul (bf16 on CUDA, fp32 on CPU) -> the device's dense rate."""
    import torch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # kernels.py's choice too
    gen = torch.Generator(device="cpu").manual_seed(0)
    x, y = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    iters, warmup = (2, 1) if small else (30, 10)
    ms = kernels.measure(lambda: x @ y, device, iters, warmup)["ms"]
    rate = 2 * n**3 / (ms * 1e-3) / 1e12
    spec = kernels.device_peak_tflops(device)
    out = {"n": n, "dtype": str(dtype).split(".")[-1], "iters": iters, "ms": ms, "tflops": rate,
           "spec_peak_tflops": spec, "fraction_of_spec_peak": None if spec is None else rate / spec}
    share = "n/a" if spec is None else f"{100 * rate / spec:.1f}% of {spec:.0f}"
    print_table(f"dense matmul {n}^3 {out['dtype']} (median of {iters})",
                ["", "ms", "TFLOP/s", "% of spec peak"], [["a @ b", f"{ms:.3f}", f"{rate:.1f}", share]])
    return out


def section_bench(args, device, out: dict):
    out["import"] = import_step3p5_ops()
    kernels = load_kernels_benchmark()
    out["matmul"] = measure_matmul(kernels, device, args.small, 256 if args.small else args.matmul_size)
    measured = out["matmul"]["tflops"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.json"
        argv = ["--json", str(path)] + (["--small", "--iters", "1", "--warmup", "1"] if args.small else [])
        print(f"\nbenchmarks/kernels.py {' '.join(argv[2:])}".rstrip())
        rc = kernels.main(argv)
        if rc != 0:
            raise RuntimeError(f"benchmarks/kernels.py exited with {rc}")
        results = json.loads(path.read_text())
    rows = []
    for r in results.get("moe", []):
        r["fraction_of_measured_matmul"] = r["tflops"] / measured
        rows.append([r["name"], f"{r['ms']:.3f}", f"{r['tflops']:.1f}",
                     "n/a" if r.get("fraction_of_peak") is None else f"{100 * r['fraction_of_peak']:.1f}%",
                     f"{100 * r['fraction_of_measured_matmul']:.1f}%"])
    print_table(f"MoE layer fwd+bwd vs this device's rates (measured matmul {measured:.1f} TFLOP/s)",
                ["", "ms", "TFLOP/s", "% spec peak", "% measured matmul"], rows)
    if device.type != "cuda":
        print("  (CPU: the fused attention rows ran the reference attention; the MoE rows name the GEMM "
              "they ran, with torch elementwise ops: no Triton off CUDA)")
    out["kernels"] = results


# ====================================================================== section: parity
def _attention_case(device, length, hq, hkv, d, window, packed, seed):
    import torch
    from mispo.models.step3p5.kernels import attention as fused
    from mispo.models.step3p5.layout import SequenceLayout
    from mispo.models.step3p5.reference_ops import torch_attention

    gen = torch.Generator(device="cpu").manual_seed(seed)
    pos = packed_positions(length, device) if packed else None
    layout = SequenceLayout.build((1, length), device, position_ids=pos)
    base = [torch.randn(1, length, h, d, generator=gen).to(device, torch.bfloat16) for h in (hq, hkv, hkv)]
    probe = torch.randn(1, length, hq, d, generator=gen).to(device)
    scale = d ** -0.5

    def run(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in base]  # fresh leaves per run
        out = fn(*leaves, layout, window, scale)
        (out.float() * probe).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    impl = fused.choose_impl(base[0], layout)
    return impl, run(torch_attention, torch.float32), run(torch_attention, torch.bfloat16), \
        run(fused.fused_attention, torch.bfloat16)


def _moe_case(device, tokens, experts, top_k, hidden, inter, limit, seed):
    import torch
    from mispo.models.step3p5.kernels import moe as fused
    from mispo.models.step3p5.kernels import triton_moe
    from mispo.models.step3p5.reference_ops import torch_experts

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=gen) * 2).to(device, torch.bfloat16)
    scores = torch.sigmoid(torch.randn(tokens, experts, generator=gen)).to(device)
    ids = torch.topk(scores, top_k, dim=-1).indices
    tw = scores.gather(-1, ids)
    tw = tw / tw.sum(-1, keepdim=True) * 3.0
    ws = [(torch.randn(experts, inter, hidden, generator=gen) * hidden ** -0.5).to(device, torch.bfloat16),
          (torch.randn(experts, inter, hidden, generator=gen) * hidden ** -0.5).to(device, torch.bfloat16),
          (torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5).to(device, torch.bfloat16)]
    probe = torch.linspace(-1, 1, hidden, device=device)

    def run(fn, dtype):
        xl = x.to(dtype, copy=True).requires_grad_()  # fresh leaves per run
        twl = tw.clone().requires_grad_()
        wl = [w.to(dtype, copy=True).requires_grad_() for w in ws]
        out = fn(xl, ids, twl, *wl, limit)
        (out.float() * probe).sum().backward()
        return [out.detach(), xl.grad, twl.grad] + [w.grad for w in wl]

    kernel = f"gemm={fused.pick_gemm(x, ws[0])}, elementwise={'triton' if triton_moe.usable(x) else 'torch'}"
    return kernel, run(torch_experts, torch.float32), run(torch_experts, torch.bfloat16), \
        run(fused.fused_experts, torch.bfloat16)


def _judge(names, oracle, ref, got) -> tuple[bool, list[dict]]:
    rows, ok = [], True
    for name, o, r, g in zip(names, oracle, ref, got):
        e_ref, e_got = rel_err(r, o), rel_err(g, o)
        good = math.isfinite(e_got) and e_got <= 1.5 * e_ref + 2e-3
        ok &= good
        rows.append({"tensor": name, "rel_err_fused": e_got, "rel_err_reference_bf16": e_ref, "ok": good})
    return ok, rows


def section_parity(args, device, out: dict):
    import torch
    note = import_step3p5_ops()
    on_gpu = device.type == "cuda"
    if args.small:
        length, hq_swa, hq_full, hkv, d, window = 256, 6, 4, 2, 32, 16
        moe_shape = dict(tokens=64, experts=8, top_k=2, hidden=64, inter=32)
    else:  # the release's head shapes; 4k tokens keep the fp32 oracle's memory modest
        length, hq_swa, hq_full, hkv, d, window = 4096, 96, 64, 8, 128, 512
        moe_shape = dict(tokens=4096, experts=288, top_k=8, hidden=4096, inter=1280)
    out.update({"import": note, "criterion": "rel_err(fused) <= 1.5 * rel_err(bf16 reference) + 2e-3 per "
                                             "tensor, errors against an fp32 oracle on the same bf16 inputs",
                "attention": [], "moe": {}})
    table = []
    cases = [(f"sliding W={window}, {hq_swa} q heads", hq_swa, window, False),
             ("full causal, {} q heads".format(hq_full), hq_full, None, False),
             (f"packed {len(DOC_FRACTIONS)} documents, W={window}, {hq_swa} q heads", hq_swa, window, True)]
    for i, (name, hq, w, packed) in enumerate(cases):
        impl, oracle, ref, got = _attention_case(device, length, hq, hkv, d, w, packed, seed=i)
        ok, rows = _judge(["out", "dq", "dk", "dv"], oracle, ref, got)
        fell_back = impl == "torch"
        out["attention"].append({"case": name, "tokens": length, "impl": impl,
                                 "fell_back_to_reference": fell_back, "ok": ok, "tensors": rows})
        for r in rows:
            first = r is rows[0]
            table.append([f"attention {name}" if first else "", r["tensor"], impl if first else "",
                          f"{r['rel_err_fused']:.2e}", f"{r['rel_err_reference_bf16']:.2e}",
                          "fallback" if fell_back else fmt(r["ok"])])
        del oracle, ref, got
        if on_gpu:
            torch.cuda.empty_cache()
    limit = 7.0
    kernel, oracle, ref, got = _moe_case(device, limit=limit, seed=7, **moe_shape)
    ok, rows = _judge(["out", "dx", "d_topk_weights", "d_gate", "d_up", "d_down"], oracle, ref, got)
    out["moe"] = {**moe_shape, "limit": limit, "kernel": kernel, "ok": ok, "tensors": rows}
    label = f"MoE {moe_shape['tokens']} tok, {moe_shape['experts']} experts top-{moe_shape['top_k']}"
    for r in rows:
        first = r is rows[0]
        table.append([label if first else "", r["tensor"], kernel if first else "",
                      f"{r['rel_err_fused']:.2e}", f"{r['rel_err_reference_bf16']:.2e}", fmt(r["ok"])])
    print_table("fused vs reference, bf16 forward + gradients (relative errors against the fp32 oracle)",
                ["case", "tensor", "fused kernel", "fused", "bf16 ref", "ok"], table, align="lll")
    if any(a["fell_back_to_reference"] for a in out["attention"]):
        print("  attention impl 'torch': the fused backend fell back to the reference here (no CUDA), so its "
              "rows compare the reference with itself -- not a kernel check")
    out["ok"] = all(a["ok"] for a in out["attention"]) and out["moe"]["ok"]


# ====================================================================== model helpers (train, logprob_gap)
def two_layer_config(layers: list[int], small: bool, backend: str):
    """The release config cut to `layers` (release decoder layer ids, kept in that order), no MTP layers."""
    from mispo.models.step3p5 import Step3p5Config

    release = json.loads(RELEASE_CONFIG.read_text())
    n = release["num_hidden_layers"]
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"--layers {','.join(map(str, layers))}: release decoder layers are 0..{n - 1}")
    fields = dict(release)
    for key in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits",
                "swiglu_limits_shared"):
        fields[key] = [release[key][i] for i in layers]
    moe = {int(s) for s in release["moe_layers_enum"].split(",")}
    fields.update(num_hidden_layers=len(layers), num_nextn_predict_layers=0, load_mtp_layers=False,
                  moe_layers_enum=",".join(str(j) for j, i in enumerate(layers) if i in moe),
                  attn_backend=backend, moe_backend=backend)
    if small:
        fields.update(SMALL_WIDTH)
    return Step3p5Config(**fields)


def describe_layers(config, layers) -> list[dict]:
    out = []
    for j, release_layer in enumerate(layers):
        spec = config.attention_spec(j)
        moe = config.is_moe_layer(j)
        out.append({"release_layer": release_layer, "attention": spec.layer_type, "window": spec.window,
                    "q_heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                    "ffn": f"MoE {config.moe_num_experts} experts top-{config.moe_top_k} + shared" if moe
                    else f"dense SwiGLU {config.intermediate_size}",
                    "swiglu_limit": config.swiglu_limit(j, shared=not moe)})
    return out


@contextlib.contextmanager
def default_dtype_and_device(dtype, device):
    """Build modules directly on `device` in `dtype` (as from_pretrained(dtype=...) does): fp32 buffers
    created with an explicit dtype (router_bias, inv_freq) stay fp32."""
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_model(args, device, backend: str):
    import torch
    from mispo.models.step3p5 import Step3p5ForCausalLM

    config = two_layer_config(args.layers, args.small, backend)
    torch.manual_seed(args.seed)
    with default_dtype_and_device(torch.bfloat16, device):
        model = Step3p5ForCausalLM(config)
    return model


def batch(args, config, device):
    import torch
    tokens = 256 if args.small else args.tokens
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=gen).to(device)
    return ids, packed_positions(tokens, device)


def resolved_backends(model, device) -> dict:
    """What the "fused" backends run here: the attention implementation and the MoE kernels."""
    import torch
    from mispo.models.step3p5.backends import get_attention_backend, get_experts_backend
    from mispo.models.step3p5.kernels import attention, fused_attention, fused_experts, moe, triton_moe
    from mispo.models.step3p5.layout import SequenceLayout
    from mispo.models.step3p5.modeling_step3p5 import StackedExpertWeight

    cfg = model.config
    attn_fn = get_attention_backend(cfg.attn_backend, device)
    experts_fn = get_experts_backend(cfg.moe_backend, device)
    probe = torch.empty(1, 1, 1, cfg.head_dim, device=device, dtype=torch.bfloat16)
    layout = SequenceLayout.build((1, 1), device)
    impl = attention.choose_impl(probe, layout) if attn_fn is fused_attention else "reference"
    stacks = [m.weight for m in model.modules() if isinstance(m, StackedExpertWeight)]
    fused_moe = bool(stacks) and experts_fn is fused_experts
    gemm = moe.pick_gemm(probe.view(1, -1), stacks[0]) if fused_moe else "reference"
    return {"attention_backend": cfg.attn_backend, "attention_impl": impl,
            "attention_fell_back_to_reference": impl in ("torch", "reference"),
            "moe_backend": cfg.moe_backend, "moe_gemm": gemm,
            "moe_elementwise": "triton" if triton_moe.usable(probe) else "torch"}


class MixedPrecisionAdamW:
    """bf16 model weights; fp32 master weights and fp32 AdamW states (DeepSpeed's bf16 recipe):
    master.grad = grad.float(); AdamW step on the masters; weight <- bf16(master)."""

    def __init__(self, params, lr: float, fused: bool):
        import torch
        self.params = list(params)
        self.master = [p.detach().float().clone() for p in self.params]
        self.inner = torch.optim.AdamW(self.master, lr=lr, fused=fused)

    def step(self):
        import torch
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # each bf16 gradient is freed as its fp32 copy is made
        self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)
                m.grad = None

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


LR = 1e-4  # large enough that one step moves bf16 weights of size 0.02 (ulp 1.2e-4)
OPTIMIZERS = {  # name: (description, bytes per parameter beyond the bf16 weights at the peak)
    "adamw-fp32": ("AdamW with fp32 master weights and fp32 states (bf16 grads; fp32 copies at the step)",
                   16),
    "adamw-bf16": ("torch AdamW on the bf16 weights: states in the parameter dtype (bf16)", 6),
    "adafactor": ("torch Adafactor on the bf16 weights: factored second moment, no first moment", 2),
}


def optimizer_plan(name: str, model, device, activation_bytes: float) -> tuple[list[str], dict]:
    """Which optimizers to try, in order: --optimizer's one, or ('auto') those of OPTIMIZERS from the first
    whose estimated peak fits the free memory on (the next is tried when one runs out of memory)."""
    import torch
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    need = {k: n * per + activation_bytes for k, (_, per) in OPTIMIZERS.items()}
    names = list(OPTIMIZERS)
    if name != "auto":
        plan = [name]
    else:
        fits = [i for i, k in enumerate(names) if free is None or need[k] < 0.92 * free]
        plan = names[fits[0] if fits else -1:]
    info = {"requested": name, "estimated_peak_gib": {k: gib(v + 2 * n) for k, v in need.items()},
            "free_gib_before": None if free is None else gib(free), "out_of_memory_with": []}
    return plan, info


def make_optimizer(name: str, model, device):
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    if name == "adamw-fp32":
        return MixedPrecisionAdamW(params, lr=LR, fused=fused)
    if name == "adamw-bf16":
        return torch.optim.AdamW(params, lr=LR, fused=fused)
    if not hasattr(torch.optim, "Adafactor"):
        raise RuntimeError("--optimizer adafactor: this torch has no torch.optim.Adafactor (>= 2.5)")
    return torch.optim.Adafactor(params, lr=1e-2)


def train_steps(model, name: str, ids, pos, device, n_timed: int, steps: list) -> None:
    """A warm-up step (compiles, autotuning, optimizer states), then n_timed steps; peak memory from
    the timed ones."""
    import torch
    opt = make_optimizer(name, model, device)
    steps.append(timed_step(model, opt, ids, pos, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(n_timed):
        steps.append(timed_step(model, opt, ids, pos, device))


# ====================================================================== section: train
def parameter_counts(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe." in n and "_proj" in n)
    embed = model.model.embed_tokens.weight.numel()
    # matmul weights one token passes through (routed experts: top_k of them; the embedding is a lookup)
    active = total - experts + experts * cfg.moe_top_k // cfg.moe_num_experts - embed
    return {"parameters": total, "expert_parameters": experts, "active_matmul_parameters": active}


def timed_step(model, opt, ids, pos, device) -> dict:
    """One forward, backward and optimizer step; seconds per phase (the gradient norm is not timed)."""
    import torch
    sync(device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack(norms)))
    sync(device)
    t3 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    t4 = time.perf_counter()
    return {"loss": float(loss.detach()), "grad_norm": grad_norm, "forward_s": t1 - t0, "backward_s": t2 - t1,
            "optimizer_s": t4 - t3, "step_s": (t2 - t0) + (t4 - t3)}


def section_train(args, device, out: dict):
    import torch
    cuda = device.type == "cuda"
    model = build_model(args, device, "fused")
    ids, pos = batch(args, model.config, device)
    tokens = ids.shape[1]
    counts = parameter_counts(model)
    weights_bytes = torch.cuda.memory_allocated(device) if cuda else None
    activation_bytes = tokens * model.config.vocab_size * 12 + 4 * 2**30  # logits, fp32 CE + grads; the rest
    plan, opt_info = optimizer_plan(args.optimizer, model, device, activation_bytes)
    backends = resolved_backends(model, device)
    layers = describe_layers(model.config, args.layers)
    steps: list[dict] = []
    out.update({"layers": layers, **counts, "tokens": tokens, "documents": doc_lengths(tokens),
                "dtype": "bfloat16", "backends": backends, "optimizer": opt_info, "steps": steps})
    width = "tiny-width (--small)" if args.small else "full-width"
    rows = [[j, d["release_layer"], d["attention"], fmt(d["window"]), f"{d['q_heads']}/{d['kv_heads']}",
             d["ffn"], d["swiglu_limit"]] for j, d in enumerate(layers)]
    print_table(f"2-layer {width} Step3p5 ({count(counts['parameters'])} parameters, "
                f"{count(counts['expert_parameters'])} in experts; bf16 weights; {tokens} tokens in "
                f"{len(DOC_FRACTIONS)} packed documents)",
                ["layer", "release", "attention", "window", "q/kv heads", "ffn", "clamp"], rows, align="rrl")
    print(f"  backends: attention {backends['attention_backend']} -> {backends['attention_impl']}; "
          f"MoE {backends['moe_backend']} -> {backends['moe_gemm']} GEMMs, "
          f"{backends['moe_elementwise']} elementwise")
    if backends["attention_fell_back_to_reference"]:
        print("  (the fused attention backend fell back to the reference attention on this device)")
    model.train()
    for i, name in enumerate(plan):
        opt_info.update(name=name, description=OPTIMIZERS[name][0])
        est, free = opt_info["estimated_peak_gib"][name], opt_info["free_gib_before"]
        room = "" if free is None else \
            f" (estimated peak {est:.0f} GiB; {free + gib(weights_bytes):.0f} GiB free before the weights)"
        print(f"  optimizer: {name}: {OPTIMIZERS[name][0]}{room}", flush=True)
        try:
            train_steps(model, name, ids, pos, device, args.steps, steps)
            break
        except torch.cuda.OutOfMemoryError:
            if i == len(plan) - 1:
                raise
        # out of memory with this optimizer (outside the except: its frames are released): the next one
        opt_info["out_of_memory_with"].append(name)
        steps.clear()
        for p in model.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  out of memory with {name}; trying {plan[i + 1]}", flush=True)
    timed = steps[1:]
    median = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    step_s = median("step_s")
    finite = all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)
    out.update({
        "first_step_s": steps[0]["step_s"], "step_s": step_s, "forward_s": median("forward_s"),
        "backward_s": median("backward_s"), "optimizer_s": median("optimizer_s"),
        "tokens_per_s": tokens / step_s,
        "matmul_tflops_estimate": 6 * counts["active_matmul_parameters"] * tokens / step_s / 1e12,
        "loss_finite": all(math.isfinite(s["loss"]) for s in steps),
        "grad_norm_finite": all(math.isfinite(s["grad_norm"]) for s in steps), "ok": finite,
        "weights_gib": gib(weights_bytes) if cuda else None,
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(device)) if cuda else None,
        "device_total_gib": gib(torch.cuda.get_device_properties(device).total_memory) if cuda else None})
    rows = [["step s (fwd + bwd + optimizer)", f"{step_s:.3f}"],
            ["  forward / backward / optimizer s",
             f"{out['forward_s']:.3f} / {out['backward_s']:.3f} / {out['optimizer_s']:.3f}"],
            ["tokens/s", f"{out['tokens_per_s']:.0f}"],
            ["6 * active params * tokens, TFLOP/s", f"{out['matmul_tflops_estimate']:.1f}"],
            ["loss (each step)", ", ".join(f"{s['loss']:.4f}" for s in steps)],
            ["loss and grad norm finite", fmt(finite)],
            ["weights GiB", fmt(out["weights_gib"], ".1f")],
            ["peak allocated / reserved GiB", f"{fmt(out['peak_allocated_gib'], '.1f')} / "
             f"{fmt(out['peak_reserved_gib'], '.1f')} of {fmt(out['device_total_gib'], '.0f')}"]]
    print_table(f"training step (median of {len(timed)} after a warm-up step of {out['first_step_s']:.1f} s)",
                ["", "value"], rows, align="l")


# ====================================================================== section: logprob_gap
def set_backends(model, attn: str, moe: str):
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "attn_backend"):
            cfg.attn_backend, cfg.moe_backend = attn, moe


def token_logprobs(model, ids, pos):
    """log p(token t+1 | ..t) for every position whose target lies in the same document."""
    import torch
    from mispo.models.step3p5.layout import SequenceLayout
    from mispo.models.step3p5.modeling_step3p5 import shifted_targets

    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos).logits[0]
        layout = SequenceLayout.build(tuple(ids.shape), ids.device, None, pos)
        targets = shifted_targets(ids, layout, 1)[0]
        valid = targets != -100
        picked = logits[valid].float()
        return picked.gather(-1, targets[valid, None])[:, 0] - torch.logsumexp(picked, -1)


def section_logprob_gap(args, device, out: dict):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model = build_model(args, device, "fused")
    model.eval()
    ids, pos = batch(args, model.config, device)
    backends = resolved_backends(model, device)
    out.update({"weights": f"random init (seed {args.seed}, std 0.02)", "fp32": "torch backends, TF32 off",
                "backends_bf16": backends})
    lp = {"bf16_fused": token_logprobs(model, ids, pos)}
    set_backends(model, "torch", "torch")
    lp["bf16_torch"] = token_logprobs(model, ids, pos)
    model.float()  # the same weights, upcast exactly
    lp["fp32_torch"] = token_logprobs(model, ids, pos)
    ref = lp["fp32_torch"].double()
    gaps = {}
    for name in ("bf16_fused", "bf16_torch"):
        d = (lp[name].double() - ref).abs()
        gaps[name] = {"mean_abs": float(d.mean()), "p99_abs": float(d.quantile(0.99)),
                      "max_abs": float(d.max())}
    finite = all(math.isfinite(v) for g in gaps.values() for v in g.values())
    out.update({"tokens_scored": int(ref.numel()), "gaps_vs_fp32": gaps,
           "mean_logprob_fp32": float(ref.mean()), "uniform_logprob": -math.log(model.config.vocab_size),
           "mean_abs": gaps["bf16_fused"]["mean_abs"], "max_abs": gaps["bf16_fused"]["max_abs"],
           "ok": finite})
    fused = f" ({backends['attention_impl']} attention, {backends['moe_gemm']} MoE)"
    rows = [[f"bf16, {k.split('_')[1]} backends" + (fused if k == "bf16_fused" else ""),
             f"{v['mean_abs']:.2e}", f"{v['p99_abs']:.2e}", f"{v['max_abs']:.2e}"] for k, v in gaps.items()]
    print_table(f"|log p_bf16 - log p_fp32| over {out['tokens_scored']} tokens (same weights, same tokens; "
                "fp32 = torch backends, TF32 off)", ["bf16 run", "mean", "p99", "max"], rows, align="l")
    print(f"  mean log p (fp32) {out['mean_logprob_fp32']:.3f}; uniform would be "
          f"{out['uniform_logprob']:.3f} (random-init weights: a trained checkpoint's gap may differ)")


# ====================================================================== section: head
def _head_pass(fused: bool, hidden, weight, labels, chunk: int):
    """log p + entropy of one micro-batch and their backward, on the fused head or the logits; returns
    (log p, entropy, d hidden, d W) and clears the leaves' gradients."""
    from mispo.algorithms.head_logprobs import head_logprobs
    from mispo.algorithms.logits import logprobs_and_entropy

    if fused:
        lp, ent = head_logprobs(hidden, weight, None, labels, chunk=chunk)
    else:
        lp, ent = logprobs_and_entropy(hidden @ weight.T, labels)
    (-(lp.sum()) - 0.01 * ent.sum()).backward()
    out = (lp.detach(), ent.detach(), hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    return out


def section_head(args, device, out: dict):
    """The fused log-prob head (no [tokens, vocab] tensor) against the chunked logits at the release's vocabulary
    and width, bf16: peak memory of one micro-batch's forward + backward, time, and the agreement."""
    import torch
    from mispo.algorithms.head_logprobs import head_chunk

    tokens, hidden_size, vocab = (256, 64, 512) if args.small else (8192, 4096, 128_896)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    h = (torch.randn(tokens, hidden_size, generator=g)).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    chunk = 64 if args.small else head_chunk(vocab)  # --small: several chunks all the same
    rows, results = [], {}
    for name, fused in (("logits (chunked)", False), ("fused head", True)):
        _head_pass(fused, h, w, labels, chunk)  # warm-up: kernels, allocator
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        results[name] = _head_pass(fused, h, w, labels, chunk)
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        out[name] = {"seconds": seconds, "peak_bytes": peak}
        rows.append([name, "-" if peak is None else f"{gib(peak):.2f}", f"{seconds * 1e3:.1f}"])
    ref, got = results["logits (chunked)"], results["fused head"]
    out.update({"tokens": tokens, "hidden": hidden_size, "vocab": vocab, "chunk": chunk,
                "logits_bytes_bf16": tokens * vocab * 2,
                "max_abs_logp": float((got[0] - ref[0]).abs().max()),
                "max_abs_entropy": float((got[1] - ref[1]).abs().max()),
                "rel_err_grad_hidden": rel_err(got[2], ref[2]), "rel_err_grad_weight": rel_err(got[3], ref[3])})
    out["ok"] = out["max_abs_logp"] < 1e-2 and out["rel_err_grad_hidden"] < 0.05 and out["rel_err_grad_weight"] < 0.05
    if device.type == "cuda":
        out["peak_ratio"] = out["fused head"]["peak_bytes"] / out["logits (chunked)"]["peak_bytes"]
    print_table(f"log p + entropy + backward of {tokens} tokens, V = {vocab:,}, hidden {hidden_size}, bf16 "
                f"(the logits alone: {gib(tokens * vocab * 2):.2f} GiB)", ["path", "peak GiB", "ms"], rows)
    print(f"  fused vs logits: max |d log p| {out['max_abs_logp']:.2e}, grad rel err hidden "
          f"{out['rel_err_grad_hidden']:.2e}, lm-head {out['rel_err_grad_weight']:.2e}")


# ====================================================================== section: pytest
def section_pytest(args, device, out: dict):
    import xml.etree.ElementTree as ET
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        shown = ["pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider"]
        print("$ " + " ".join(shown))
        timeout = max(10.0, args.deadline_s - 15)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in [env.get("PYTHONPATH")] if x])
        try:
            rc = subprocess.run([sys.executable, "-m", *shown, f"--junitxml={junit}"], cwd=ROOT, env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pytest ran past {timeout:.0f} s (this section's --budget-s share)") from None
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if device.type != "cuda":
        print("  (no CUDA: the gpu tests are skipped here)")
    out.update({"command": " ".join(shown), "returncode": rc, **counts, "ok": rc in (0, 5)})  # 5: none ran


SECTION_FNS = {"bench": section_bench, "parity": section_parity, "train": section_train,
               "logprob_gap": section_logprob_gap, "head": section_head, "pytest": section_pytest}


class SectionTimeout(Exception):
    """Raised in a section by SIGTERM: the driver's time cap for it has passed."""


def _on_sigterm(signum, frame):
    raise SectionTimeout("stopped by the driver at its time cap (its share of --budget-s)")


def child_main(args) -> int:
    """Run one section; always write {status, seconds, device, what it measured so far} to --result."""
    t0 = time.perf_counter()
    print(f"\n{'=' * 100}\n== {args.section}  (at most {args.deadline_s:.0f} s)\n{'=' * 100}", flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    out: dict = {}
    status, error = "ok", {}
    try:
        device = device_of(args)
        out["device"] = "cpu"
        if device.type == "cuda":
            import torch
            out["device"] = torch.cuda.get_device_name(device)
        SECTION_FNS[args.section](args, device, out)
    except SectionTimeout as exc:
        status, error = "timeout", {"error": str(exc)}
    except Exception as exc:
        tb = traceback.format_exc()
        print(tb, flush=True)
        status, error = "failed", {"error": f"{type(exc).__name__}: {exc}", "traceback": tb[-3000:]}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if out.get("device", "cpu") != "cpu":  # this process's peak, warm-up included (also when it failed)
        import torch
        out["process_max_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
    result = {"status": status, **error, **out, "seconds": time.perf_counter() - t0}
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0


# ====================================================================== the driver
def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(),
           "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "packages": {}, "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ}}
    for name in OPTIONAL:
        ok, what = importable(name, load=name in ("transformers", "pytest"))  # the two that decide skips
        env["packages"][name] = what if ok else f"missing ({what})"
    env["has"] = {name: not env["packages"][name].startswith("missing") for name in OPTIONAL}
    return env


def stream(pipe, tail: collections.deque):
    for line in iter(pipe.readline, ""):
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)
    pipe.close()


def child_command(name: str, args, result: Path, timeout: float) -> list[str]:
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--section", name, "--result", str(result),
           "--deadline-s", str(timeout), "--layers", ",".join(map(str, args.layers)),
           "--tokens", str(args.tokens), "--steps", str(args.steps), "--seed", str(args.seed),
           "--optimizer", args.optimizer, "--matmul-size", str(args.matmul_size)]
    return cmd + (["--small"] if args.small else [])


def run_section(name: str, args, timeout: float) -> dict:
    """The section in a subprocess (its own process group), output streamed; killed at `timeout`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen(child_command(name, args, result, timeout), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        tail: collections.deque = collections.deque(maxlen=25)
        reader = threading.Thread(target=stream, args=(proc.stdout, tail), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # the section and what it started (pytest, compile workers)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                    break
        reader.join(timeout=5)
        seconds = time.perf_counter() - t0
        if result.exists():
            return json.loads(result.read_text())
        if timed_out:
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s (its share of --budget-s)",
                    "seconds": seconds, "output_tail": "".join(tail)}
        return {"status": "crashed", "error": f"exited with code {proc.returncode} without a result",
                "seconds": seconds, "output_tail": "".join(tail)}


def _bench_rows(r: dict) -> list[list]:
    m = r["matmul"]
    spec = "" if not m["spec_peak_tflops"] else \
        f" ({100 * m['fraction_of_spec_peak']:.0f}% of spec {m['spec_peak_tflops']:.0f})"
    rows = [["bench", f"matmul {m['n']}^3 {m['dtype']} TFLOP/s", f"{m['tflops']:.1f}{spec}"]]
    for case, attn_rows in r["kernels"].get("attention", {}).items():
        for a in attn_rows:
            if a["name"].startswith("fused"):
                rows.append(["", f"attention {case}: {a['name']}",
                             f"{a['ms']:.2f} ms, {fmt(a.get('speedup_vs_baseline'), '.2f')}x vs SDPA + mask"])
    for moe in r["kernels"].get("moe", []):
        if moe["name"].startswith("fused"):
            frac = moe.get("fraction_of_peak")
            spec = "" if frac is None else f", {100 * frac:.1f}% of spec"
            rows.append(["", f"MoE {moe['name']}",
                         f"{moe['ms']:.2f} ms, {fmt(moe.get('speedup_vs_baseline'), '.2f')}x vs loop, "
                         f"{moe['tflops']:.1f} TFLOP/s = {100 * moe['fraction_of_measured_matmul']:.1f}% of "
                         f"measured{spec}"])
    return rows


def summary_rows(name: str, r: dict) -> list[list]:
    """[section, what, result] lines of the final table."""
    if r.get("status") != "ok":
        return [[name, r.get("status", "?"), (r.get("reason") or r.get("error") or "")[:160]]]
    if name == "bench":
        return _bench_rows(r)
    if name == "parity":
        rows = []
        for a in r["attention"]:
            worst = max(t["rel_err_fused"] for t in a["tensors"])
            verdict = "reference fallback, not a kernel check" if a["fell_back_to_reference"] \
                else fmt(a["ok"])
            rows.append(["" if rows else name, f"attention {a['case']} ({a['impl']})",
                         f"{verdict}; worst rel err {worst:.1e}"])
        worst = max(t["rel_err_fused"] for t in r["moe"]["tensors"])
        return rows + [["", f"MoE ({r['moe']['kernel']})",
                        f"{fmt(r['moe']['ok'])}; worst rel err {worst:.1e}"]]
    if name == "train":
        b = r["backends"]
        return [[name, "step s (median) / first step s", f"{r['step_s']:.3f} / {r['first_step_s']:.1f}"],
                ["", "peak allocated GiB", fmt(r["peak_allocated_gib"], ".1f")],
                ["", "loss finite / last loss", f"{fmt(r['ok'])} / {r['steps'][-1]['loss']:.4f}"],
                ["", "optimizer / backends",
                 f"{r['optimizer']['name']} / attention {b['attention_impl']}, MoE {b['moe_gemm']}"]]
    if name == "logprob_gap":
        torch_gap = r["gaps_vs_fp32"]["bf16_torch"]
        return [[name, "bf16 fused vs fp32: mean / max |d log p|",
                 f"{r['mean_abs']:.2e} / {r['max_abs']:.2e}"],
                ["", "bf16 torch vs fp32: mean / max |d log p|",
                 f"{torch_gap['mean_abs']:.2e} / {torch_gap['max_abs']:.2e}"]]
    if name == "head":
        peaks = [r[k]["peak_bytes"] for k in ("logits (chunked)", "fused head")]
        memory = "-" if None in peaks else f"{gib(peaks[0]):.2f} -> {gib(peaks[1]):.2f}"
        return [[name, "peak GiB logits -> fused head", memory],
                ["", "fused vs logits: max |d log p| / grad rel err",
                 f"{fmt(r['ok'])}; {r['max_abs_logp']:.1e} / {max(r['rel_err_grad_hidden'], r['rel_err_grad_weight']):.1e}"]]
    return [[name, r["command"], f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
                                 f"{r['skipped']} skipped"]]


def write_json(path: Path | None, report: dict):
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def skip_reason(name: str, env: dict) -> str | None:
    if name in NEEDS_MODEL and not env["has"]["transformers"]:
        return "transformers is not importable (the model is a transformers PreTrainedModel)"
    if name == "pytest" and not env["has"]["pytest"]:
        return "pytest is not importable (the parity section ran its checks inline)"
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--small", action="store_true", help="tiny sizes; runs on CPU (checks the script)")
    add("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    add("--budget-s", type=float, default=None, help="wall-clock budget of all sections "
        "(default 450: the whole run stays under 8 minutes; 900 with --small)")
    add("--out", type=Path, default=None, help="JSON results (default $OUT/gpu_check.json when $OUT is set)")
    add("--layers", default="0,43", help="release decoder layers of the 2-layer model (default 0,43: "
        "full attention + dense MLP, sliding window + 288-expert MoE)")
    add("--tokens", type=int, default=8192, help="tokens of the training / log-prob batch")
    add("--steps", type=int, default=None, help="timed training steps after the warm-up (3; 1 with --small)")
    add("--optimizer", default="auto", help=f"auto (the first that fits) or one of {', '.join(OPTIMIZERS)}")
    add("--matmul-size", type=int, default=8192)
    add("--seed", type=int, default=0)
    add("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a child process: its one section
    add("--result", help=argparse.SUPPRESS)
    add("--deadline-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--layers {args.layers!r}: comma-separated release layer ids, e.g. 0,43")
    if args.optimizer != "auto" and args.optimizer not in OPTIMIZERS:
        parser.error(f"--optimizer {args.optimizer!r}: use auto or one of {', '.join(OPTIMIZERS)}")
    args.steps = args.steps if args.steps is not None else (1 if args.small else 3)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.tokens < 64:
        parser.error(f"--tokens {args.tokens}: at least 64 (the batch packs {len(DOC_FRACTIONS)} documents)")
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in args.sections if x not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "gpu_check.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return child_main(args)
    budget = args.budget_s if args.budget_s is not None else (900.0 if args.small else 450.0)
    caps = SMALL_CAPS if args.small else CAPS
    env = environment()
    rows = [["python / torch / torch CUDA", f"{env['python']} / {env['torch']} / {env['torch_cuda']}"],
            ["CUDA devices", env["cuda_devices"]]]
    rows += [[k, v] for k, v in env["packages"].items()] + [[k, v] for k, v in env["env"].items()]
    print_table("environment", ["", "value"], rows, align="ll")
    if not env["cuda_available"] and not args.small:
        print("\nno CUDA device: the full-size check needs a GPU (use --small to check the script on CPU)")
        return 2
    report = {"small": args.small, "budget_s": budget, "layers": args.layers, "tokens": args.tokens,
              "environment": env, "sections": {}}
    start = time.perf_counter()
    for i, name in enumerate(args.sections):
        left = budget - (time.perf_counter() - start)
        timeout = min(caps[name][0], left - sum(caps[x][1] for x in args.sections[i + 1:]))
        reason = skip_reason(name, env)
        if reason is None and timeout < 15:
            reason = f"{left:.0f} s of --budget-s {budget:.0f} left"
        result = {"status": "skipped", "reason": reason} if reason else run_section(name, args, timeout)
        if result["status"] != "ok":
            print(f"\n== {name}: {result['status']}: {result.get('reason') or result.get('error')}")
        report["sections"][name] = result
        report["elapsed_s"] = time.perf_counter() - start
        write_json(args.out, report)
    rows = [row for name, r in report["sections"].items() for row in summary_rows(name, r)]
    print_table(f"summary ({report['elapsed_s']:.0f} s of {budget:.0f})", ["section", "what", "result"], rows,
                align="lll")
    bad = [n for n, r in report["sections"].items()
           if r["status"] not in ("ok", "skipped") or r.get("ok") is False]
    print(f"\nJSON: {args.out}" if args.out else "\nJSON: not written (no --out and $OUT is unset)")
    if bad:
        print(f"not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
