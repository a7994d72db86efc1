"""Packed micro-batches on CPU: the learner's per-sequence attention against the full [T, T] mask, in one run.

    python benchmarks/packed_attention.py            # a ~25M Llama, transformers' "sdpa" vs "mispo_packed"
    python benchmarks/packed_attention.py --step3p5  # the tiny Step3p5 policy, masked vs segment attention

Llama: the same 16,384 tokens (sequences of `--seq-len`) as 8 micro-batches of 2,048 tokens and as
one of 16,384; packed forward + log-prob backward of each, with transformers' default attention
(one [T, T] packed mask; `use_cache=False`, else it ignores the packing) and with "mispo_packed".
Prints seconds and the ratios: 16k / 2k per attention (quadratic growth), default / packed.

Step3p5: the tiny recipes' micro-batches (256 sequences of ~25 tokens, 128 of ~150, a mix);
forward and forward+backward seconds for both attentions and the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# the repository root in place of this folder, whose kernels.py would shadow the `kernels` package
sys.path[0] = str(Path(__file__).resolve().parents[1])

from mispo.batch import Sample  # noqa: E402
from mispo.learner.packed_attention import use_packed_attention  # noqa: E402
from mispo.learner.packing import pack_samples, token_logprobs  # noqa: E402

TOTAL_TOKENS = 16384
MICRO_BATCH_TOKENS = (2048, 16384)
STEP3P5_WORKLOADS = {"math 256 x 25": [25] * 256, "tool 128 x 150": [150] * 128,
                     "mix 24 x 25 + 8 x 150": [25] * 24 + [150] * 8}


def samples(lengths: list[int], vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(7, vocab, (n,), generator=g).tolist()
        out.append(Sample(prompt_ids=ids[:8], response_ids=ids[8:], rollout_logprobs=[0.0] * (n - 8),
                          loss_mask=[1] * (n - 8), finish_reason="stop"))
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_25m():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).train()


def run_llama(args) -> None:
    default = llama_25m()
    packed = copy.deepcopy(default)
    use_packed_attention(packed)
    params = sum(p.numel() for p in default.parameters()) / 1e6
    batch = samples([args.seq_len] * (TOTAL_TOKENS // args.seq_len), 32000)
    print(f"Llama {params:.1f}M params, {TOTAL_TOKENS} tokens in sequences of {args.seq_len}, "
          f"forward + backward seconds per {TOTAL_TOKENS} tokens")

    def step(model, micro):
        for mb in micro:
            logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            token_logprobs(logits, mb.input_ids).sum().backward()
        model.zero_grad(set_to_none=True)

    first = pack_samples(batch, [0], MICRO_BATCH_TOKENS[0])
    for model in (default, packed):
        step(model, first)  # warm-up: one sequence
    results = {}
    for tokens in MICRO_BATCH_TOKENS:
        micro = pack_samples(batch, list(range(len(batch))), tokens)
        for name, model in (("sdpa", default), ("mispo_packed", packed)):
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(model, micro)
                runs.append(time.perf_counter() - start)
            results[name, tokens] = statistics.median(runs)
            print(f"  {name:<13} micro_batch_tokens {tokens:>6} ({len(micro)} micro-batches): "
                  f"{results[name, tokens]:7.2f} s", flush=True)
    small, large = MICRO_BATCH_TOKENS
    for name in ("sdpa", "mispo_packed"):
        print(f"  {name:<13} {large} / {small}: {results[name, large] / results[name, small]:5.2f}x")
    for tokens in MICRO_BATCH_TOKENS:
        ratio = results["sdpa", tokens] / results["mispo_packed", tokens]
        print(f"  sdpa / mispo_packed at {tokens:>6}: {ratio:5.2f}x")


def run_step3p5(args) -> None:
    import mispo.models.step3p5.backends as backends
    from mispo.learner.models import load_policy
    from mispo.models.step3p5.reference_ops import masked_attention
    from mispo.models.step3p5.tiny import tiny_config, write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_checkpoint(Path(d) / "tiny", seed=0,
                                     config=tiny_config(hidden_size=128, num_hidden_layers=4, sliding_window=64))
        model = load_policy(path, "float32")
    backends.register_attention_backend("masked", masked_attention)  # the baseline: always the mask
    print(f"{'workload':<24}{'tokens':>8}  {'mask fwd':>9} {'seg fwd':>8} {'ratio':>6}  "
          f"{'mask f+b':>9} {'seg f+b':>8} {'ratio':>6}")
    for name, lengths in STEP3P5_WORKLOADS.items():
        mb = pack_samples(samples(lengths, 90), list(range(len(lengths))), 1 << 20)[0]

        def forward(grad: bool):
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
                if grad:
                    token_logprobs(logits, mb.input_ids).sum().backward()

        results = {}
        for backend in ("masked", "torch"):  # "torch": the reference, which picks segment attention
            model.config.attn_backend = backend
            results[backend] = (timed(lambda: forward(False), args.repeats),
                                timed(lambda: forward(True), args.repeats))
        (mf, mfb), (sf, sfb) = results["masked"], results["torch"]
        print(f"{name:<24}{mb.num_tokens:>8}  {mf:9.3f} {sf:8.3f} {mf / sf:5.1f}x  "
              f"{mfb:9.3f} {sfb:8.3f} {mfb / sfb:5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, help="timed runs (Llama 1, Step3p5 5)")
    parser.add_argument("--seq-len", type=int, default=512, help="Llama: tokens per packed sequence")
    parser.add_argument("--step3p5", action="store_true", help="the tiny Step3p5 policy's backends instead")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.step3p5 else 1
    (run_step3p5 if args.step3p5 else run_llama)(args)


if __name__ == "__main__":
    main()
