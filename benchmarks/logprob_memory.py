"""Peak memory of one micro-batch's log-probs + entropy + backward: the fused head and the chunked logits against
the naive full softmax.

    python benchmarks/logprob_memory.py                        # V = 128,896 (the release), 2048 tokens
    python benchmarks/logprob_memory.py --tokens 4096 16384 --json results.json
    python benchmarks/logprob_memory.py --vocab 4096 --tokens 512 --hidden 16 --chunk 128   # tiny

One micro-batch on CPU: hidden states [T, H] times an lm-head [V, H] give the logits [T, V] (--dtype,
bfloat16 as on the GPU learners), then per-token log p(label) and entropy at a temperature, a loss of
both, and the backward into the hidden states and the lm-head. Variants, each in a fresh process:

    full     the naive path: log_softmax(logits.float() / temperature), gather, -(p log p).sum(-1) (baseline)
    chunked  mispo.algorithms.logits.logprobs_and_entropy on the [T, V] logits
    learner  mispo.learner.packing.token_logprobs_and_entropy on [1, T, V]: the learner's logits path (for a
             model that transforms its logits; it reads them as a [T, V] view: one gradient, not two)
    fused    mispo.algorithms.head_logprobs from the hidden states and the lm-head, --head-chunk positions at
             a time (default head_chunk(V)): what the learner runs for a plain lm_head; no [T, V] tensor

Peak = the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs once the
inputs exist) minus its resident set at that moment: every byte torch touched, the allocator's included.
Each variant runs in its own process with MALLOC_MMAP_THRESHOLD_ set, so freed tensors leave the
resident set at once. Pages count once written: the chunked backward's gradient, filled chunk by chunk,
lacks its last chunk at the peak, so CPU measures ~0.5 fp32 chunk (bf16) below the GPU figure the plan
charges. A variant whose rough need (`naive_estimate`, or the formula) exceeds MemAvailable is skipped.

Printed per variant: peak MiB; predicted MiB (`mispo.plan.memory.logits_bytes`, the formula `mispo plan`
charges, + the lm-head's own gradients T H b + V H b); the logits' share of the peak beyond the logits
and their gradient (2 T V b, which every path holds), in fp32 [chunk, V] chunks and in fp32 [T, V] copies;
and the ratio peak / full peak. Goal: the share stays O(one chunk x V), not several full copies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RELEASE_VOCAB = 128_896
VARIANTS = ("full", "chunked", "learner", "fused")
MiB = 2**20


# --------------------------------------------------------------------------- one variant, in its own process
def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _step(variant: str, hidden, weight, labels, temperature: float, chunk: int) -> None:
    """Logits, log-probs + entropy, loss, backward: one micro-batch of the policy update's tail."""
    import torch

    if variant == "fused":  # `chunk` here is the head's chunk: the logits never exist whole
        from mispo.algorithms.head_logprobs import head_logprobs
        logp, ent = head_logprobs(hidden, weight, None, labels, temperature, chunk=chunk)
        (-(logp.sum()) - 0.01 * ent.sum()).backward()
        return

    from mispo.algorithms.logits import logprobs_and_entropy
    from mispo.learner.packing import token_logprobs_and_entropy

    logits = hidden @ weight.T
    if variant == "full":
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        del logp_all
    elif variant == "chunked":
        logp, ent = logprobs_and_entropy(logits, labels, chunk, temperature)
    else:  # the learner's call: ids [1, T], position t predicts ids[t + 1]
        ids = torch.cat([labels[:1], labels])[None, :-1]
        logp, ent = token_logprobs_and_entropy(logits[None], ids, temperature, chunk)
    (-(logp.sum()) - 0.01 * ent.sum()).backward()  # logits stay referenced until here, as in the learner
    del logits


def run_child(variant: str, tokens: int, vocab: int, hidden: int, dtype: str, chunk: int, threads: int) -> dict:
    """Measure one variant in this process: {peak_bytes, seconds}."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)

    def inputs(n: int):
        h = torch.randn(n, hidden, generator=g).to(dt).requires_grad_()
        w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dt).requires_grad_()
        return h, w, torch.randint(0, vocab, (n,), generator=g)

    _step(variant, *inputs(min(tokens, 8)), 1.0, chunk)  # kernels and libraries loaded before the baseline
    h, w, labels = inputs(tokens)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _resident()
    start = time.perf_counter()
    _step(variant, h, w, labels, 1.0, chunk)
    seconds = time.perf_counter() - start
    assert h.grad is not None and w.grad is not None
    return {"peak_bytes": _high_water() - base, "seconds": seconds}


def measure(variant: str, tokens: int, vocab: int, hidden: int, dtype: str, chunk: int, threads: int) -> dict:
    """run_child in a fresh Python process (so no earlier variant's pages or caches count)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--tokens", str(tokens),
           "--vocab", str(vocab), "--hidden", str(hidden), "--dtype", dtype, "--chunk", str(chunk),
           "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} at {tokens} tokens failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the predicted figures
def dtype_bytes(dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4}[dtype]


def predicted_bytes(variant: str, tokens: int, vocab: int, hidden: int, dtype: str, chunk: int) -> float | None:
    """The plan's figure (None for the naive path) + the lm-head's gradients (T H b + V H b): `logits_bytes`
    for the logits paths, `head_logprob_bytes` for the fused head."""
    from mispo.plan.memory import head_logprob_bytes, logits_bytes

    if variant == "full":
        return None
    b = dtype_bytes(dtype)
    head = head_logprob_bytes(tokens, vocab, chunk) if variant == "fused" else logits_bytes(tokens, vocab, b, chunk)
    return head + (tokens + vocab) * hidden * b


def naive_estimate(tokens: int, vocab: int, dtype: str) -> float:
    """Rough need of the naive path, to skip what this machine cannot hold: 2 T V b + 5 fp32 [T, V] copies."""
    return tokens * vocab * (2 * dtype_bytes(dtype) + 5 * 4)


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _need(variant: str, tokens: int, args) -> float:
    if variant == "full":
        return naive_estimate(tokens, args.vocab, args.dtype)
    return predicted_bytes(variant, tokens, args.vocab, args.hidden, args.dtype, chunk_of(variant, args))


def _too_big(variant: str, tokens: int, args) -> bool:
    return _need(variant, tokens, args) > mem_available()


def row(variant: str, tokens: int, args, got: dict | None) -> dict:
    b, V, chunk = dtype_bytes(args.dtype), args.vocab, chunk_of(variant, args)
    c = min(chunk, tokens)
    out = {"variant": variant, "tokens": tokens, "vocab": V, "hidden": args.hidden, "dtype": args.dtype,
           "chunk": chunk, "predicted_bytes": predicted_bytes(variant, tokens, V, args.hidden, args.dtype, chunk)}
    if got is None:
        return out | {"skipped": True}
    held = 0 if variant == "fused" else 2 * tokens * V * b  # the logits and their gradient (none when fused)
    share = got["peak_bytes"] - held
    return out | got | {"share_bytes": share, "share_chunks": share / (c * V * 4),
                        "share_full_copies": share / (tokens * V * 4)}


def chunk_of(variant: str, args) -> int:
    """Positions per chunk: --head-chunk for the fused head, --chunk for the logits paths."""
    return args.head_chunk if variant == "fused" else args.chunk


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048], help="tokens per micro-batch (T)")
    parser.add_argument("--vocab", type=int, default=RELEASE_VOCAB)
    parser.add_argument("--hidden", type=int, default=64, help="lm-head input size (the release: 4096; small "
                        "keeps the matmuls cheap, and they are not what is measured)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--chunk", type=int, default=None, help="positions per chunk (default LOGITS_CHUNK)")
    parser.add_argument("--head-chunk", type=int, default=None, help="the fused head's positions per chunk "
                        "(default head_chunk(V), what the learner uses)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # the repository root first, and not this folder: its kernels.py would shadow the `kernels` package
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    from mispo.algorithms.logits import LOGITS_CHUNK

    from mispo.algorithms.head_logprobs import head_chunk

    args.chunk = args.chunk or LOGITS_CHUNK
    args.head_chunk = args.head_chunk or head_chunk(args.vocab)
    if args.child:
        got = run_child(args.child, args.tokens[0], args.vocab, args.hidden, args.dtype, args.chunk, args.threads)
        print(json.dumps(got))
        return 0

    print(f"V = {args.vocab:,}, hidden {args.hidden}, {args.dtype} logits, chunk {args.chunk} (fused head: "
          f"{args.head_chunk}), "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print(f"{'tokens':>6} {'variant':<8} {'peak MiB':>9} {'predicted':>9} {'share: chunks':>14} {'full copies':>11} "
          f"{'vs full':>7} {'s':>5}", flush=True)
    rows = []
    for tokens in args.tokens:
        group = [row(v, tokens, args, None if skip else measure(v, tokens, args.vocab, args.hidden, args.dtype,
                                                                chunk_of(v, args), args.threads))
                 for v in args.variants for skip in [_too_big(v, tokens, args)]]
        full = next((r for r in group if r["variant"] == "full" and "peak_bytes" in r), None)
        for r in group:
            if "peak_bytes" not in r:
                print(f"{tokens:>6} {r['variant']:<8} skipped: needs ~{_need(r['variant'], tokens, args) / 2**30:.0f}"
                      f" GiB, MemAvailable {mem_available() / 2**30:.0f} GiB")
                continue
            if full:
                r["ratio_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
            ratio = f"{r['ratio_vs_full']:.2f}" if full else "-"
            print(f"{tokens:>6} {r['variant']:<8} {_fmt(r['peak_bytes']):>9} {_fmt(r['predicted_bytes']):>9} "
                  f"{r['share_chunks']:>14.2f} {r['share_full_copies']:>11.2f} {ratio:>7} {r['seconds']:>5.1f}")
            if r["predicted_bytes"] is not None and r["peak_bytes"] > 1.02 * r["predicted_bytes"]:
                print(f"{tokens:>6} {r['variant']:<8} WARNING: the measured peak exceeds the plan's formula by "
                      f"{r['peak_bytes'] / r['predicted_bytes'] - 1:.0%} (2% is allocator and kernel slack)")
        rows += group
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"note": "python benchmarks/logprob_memory.py; see its docstring",
                                         "rows": rows}, indent=1) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
