"""The learner's packed micro-batches on CPU: per-sequence attention (`segment_attention`, what the
reference backend picks) against the full [T, T] mask (`masked_attention`, the baseline), in one run.

    python benchmarks/packed_attention.py [--repeats 5]

Workloads are the tiny recipes' micro-batches: math (256 sequences of ~25 tokens), tool episodes
(128 of ~150) and a mix. Prints forward and forward+backward seconds of the tiny Step3p5 policy per
micro-batch for both, and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mispo.models.step3p5.backends as backends  # noqa: E402
from mispo.batch import Sample  # noqa: E402
from mispo.learner.models import load_policy  # noqa: E402
from mispo.learner.packing import pack_samples, token_logprobs  # noqa: E402
from mispo.models.step3p5.tiny import tiny_config, write_tiny_checkpoint  # noqa: E402

WORKLOADS = {"math 256 x 25": [25] * 256, "tool 128 x 150": [150] * 128, "mix 24 x 25 + 8 x 150": [25] * 24 + [150] * 8}


def samples(lengths: list[int]) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(7, 90, (n,), generator=g).tolist()
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_checkpoint(Path(d) / "tiny", seed=0,
                                     config=tiny_config(hidden_size=128, num_hidden_layers=4, sliding_window=64))
        model = load_policy(path, "float32")
    backends.register_attention_backend("masked", backends.masked_attention)  # the baseline: always the mask
    print(f"{'workload':<24}{'tokens':>8}  {'mask fwd':>9} {'seg fwd':>8} {'ratio':>6}  "
          f"{'mask f+b':>9} {'seg f+b':>8} {'ratio':>6}")
    for name, lengths in WORKLOADS.items():
        mb = pack_samples(samples(lengths), list(range(len(lengths))), 1 << 20)[0]

        def forward(grad: bool):
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
                if grad:
                    token_logprobs(logits, mb.input_ids).sum().backward()

        results = {}
        for backend in ("masked", "torch"):  # "torch": the reference, which picks segment attention
            model.config.attn_backend = backend
            results[backend] = (timed(lambda: forward(False), args.repeats), timed(lambda: forward(True), args.repeats))
        (mf, mfb), (sf, sfb) = results["masked"], results["torch"]
        print(f"{name:<24}{mb.num_tokens:>8}  {mf:9.3f} {sf:8.3f} {mf / sf:5.1f}x  "
              f"{mfb:9.3f} {sfb:8.3f} {mfb / sfb:5.1f}x")


if __name__ == "__main__":
    main()
