"""Step-time breakdown of `mispo train` on the tiny math recipe: where a step's seconds go, learner
tokens/s and weight-sync time, from one short run on this machine.

    python benchmarks/train_step.py [--steps 8] [key=value ...]

Prints mean seconds per phase (after the first step, which warms caches), each phase's share of the
step, and tokens/s of the learner (forward for pi_old and values + actor and critic updates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time/reward_s", "time/forward_s", "time/train_s", "time/weight_sync_s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "mispo", "train", "recipes/math_expert.yaml", f"trainer.max_steps={args.steps}",
               "trainer.eval_every=0", "trainer.save_every=0", *args.overrides, "--output", out]
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r][1:]
    mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)  # noqa: E731
    step = mean("time/step_s")
    print(f"steps measured: {len(rows)} (first step excluded); step time {step:.2f} s")
    for key in PHASES:
        print(f"  {key.removeprefix('time/').removesuffix('_s'):<12} {mean(key):7.3f} s  {100 * mean(key) / step:5.1f}%")
    rollout = step - sum(mean(k) for k in PHASES)
    print(f"  {'rollout':<12} {rollout:7.3f} s  {100 * rollout / step:5.1f}%  (generation, the remainder)")
    tokens = mean("throughput/tokens")
    prompt_and_response = tokens  # response tokens trained on per step
    learner = mean("time/forward_s") + mean("time/train_s")
    print(f"learner: {prompt_and_response / learner:,.0f} response tokens/s (forward + update); "
          f"weight sync {mean('time/weight_sync_s'):.3f} s per step")


if __name__ == "__main__":
    main()
