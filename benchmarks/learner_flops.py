"""The learner's achieved FLOP/s against a plain matmul on the same machine, in the same run and dtype.

    python benchmarks/learner_flops.py                     # float32 and bfloat16, 25M Llama, 16k tokens
    python benchmarks/learner_flops.py --dtype bfloat16 --micro-batch-tokens 4096

The learner side is the policy update's own code path on one process (no DeepSpeed, no Ray): a random
~25M-parameter Llama (the vs_trl "medium" shape) loaded by `learner.models.load_policy` (packed
per-sequence attention), samples packed by `learner.packing.pack_samples` into micro-batches of
`--micro-batch-tokens`, log-probs and entropy by `packing.forward_logprobs` (the model's forward with
the fused log-prob head, as the policy update calls it), a token-mean loss, backward. Sequences: a 40-token prompt and a 128-token response each (the medium workload).

Model FLOPs per token (forward + backward = 3x forward):
    6 * (matmul parameters: every Linear's weight, the LM head included)
    + 6 * 2 * layers * hidden * (causal context per token, i.e. sum over positions of t / L)
The baseline: an N x N x N matmul (N = --matmul-size, 2 * N^3 FLOPs) in the same dtype, best of 5.
Ratio = learner FLOP/s / matmul FLOP/s (1.0 would be every learner FLOP at peak matmul speed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT, RESPONSE = 40, 128


def matmul_flops(size: int, dtype) -> float:
    """Best-of-5 FLOP/s of one size^3 matmul."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def model_flops_per_token(model, seq_len: int) -> float:
    """6 * matmul parameters + the attention score / value FLOPs of a causal sequence of `seq_len`."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    c = model.config
    mean_context = (seq_len + 1) / 2  # position t attends to t + 1 keys
    return 6 * linear + 6 * 2 * c.num_hidden_layers * c.hidden_size * mean_context


def learner_flops(model_dir: Path, dtype: str, micro_batch_tokens: int, sequences: int, repeats: int) -> dict:
    """FLOP/s of forward + backward over `sequences` packed samples, best of `repeats` passes."""
    import torch

    from mispo.batch import Sample
    from mispo.learner.models import load_policy
    from mispo.learner.packing import forward_logprobs, gather_response, pack_samples

    model = load_policy(str(model_dir), dtype).train()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    samples = [Sample(prompt_ids=torch.randint(5, vocab, (PROMPT,), generator=g).tolist(),
                      response_ids=torch.randint(5, vocab, (RESPONSE,), generator=g).tolist(),
                      rollout_logprobs=[0.0] * RESPONSE, loss_mask=[1] * RESPONSE, finish_reason="length",
                      group=i, reward=0.0) for i in range(sequences)]
    micro = pack_samples(samples, list(range(sequences)), micro_batch_tokens)
    tokens = sequences * (PROMPT + RESPONSE)

    def one_pass() -> float:
        start = time.perf_counter()
        for mb in micro:
            logp, _ = forward_logprobs(model, mb, None, 1.0, with_entropy=True)
            loss = -gather_response(logp, mb, RESPONSE).sum() / (sequences * RESPONSE)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    one_pass()  # warm-up
    best = min(one_pass() for _ in range(repeats))
    flops = model_flops_per_token(model, PROMPT + RESPONSE) * tokens
    return {"tokens": tokens, "micro_batches": len(micro), "seconds": best, "tokens_per_s": tokens / best,
            "flops_per_s": flops / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--sequences", type=int, default=96, help="packed samples per pass (168 tokens each)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "learner_flops.json")
    args = parser.parse_args()
    # the repository root first, and not this folder: its kernels.py would shadow the `kernels` package
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import torch

    from benchmarks.vs_trl import CONFIGS, write_model  # the same random model as vs_trl's "medium"

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="learner_flops_") as tmp:
        model_dir = write_model(CONFIGS["medium"], Path(tmp) / "llama")
        for dtype in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
            peak = matmul_flops(args.matmul_size, getattr(torch, dtype))
            got = learner_flops(model_dir, dtype, args.micro_batch_tokens, args.sequences, args.repeats)
            rows.append({"dtype": dtype, "micro_batch_tokens": args.micro_batch_tokens,
                         "matmul_flops_per_s": peak, **got, "ratio": got["flops_per_s"] / peak})
            print(f"{dtype:<9} matmul {peak / 1e9:6.0f} GFLOP/s   learner {got['flops_per_s'] / 1e9:6.0f} GFLOP/s "
                  f"({got['tokens_per_s']:.0f} tok/s, {got['micro_batches']} micro-batches)   "
                  f"ratio {got['flops_per_s'] / peak:.2f}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"note": "python benchmarks/learner_flops.py; see its docstring",
                                       "rows": rows}, indent=1) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
