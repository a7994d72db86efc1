"""The step-time model (mispo/plan/step_time.py) against NeMo-RL v0.6's published H100 numbers, then its
prediction for the 196B recipe. CPU only, a few seconds.

    python benchmarks/step_time_calibration.py
    python benchmarks/step_time_calibration.py --json benchmarks/results/step_time_calibration.json

Calibration rows: NeMo-RL v0.6 performance summary (docs/about/performance-summary.md, "H100 BF16
Benchmarks"), on-policy GRPO, generation colocated with training; layouts from the v0.6.0 performance
recipes (see mispo.plan.step_time.NEMO_RL_V06). The model's constants are the defaults of
StepTimeInputs / Hardware, stated a priori (not fitted to these rows). Ratio = predicted / published
tokens/s/GPU (> 1: the model is optimistic). Qwen3 rows are the check (within 2x, tests/plan/test_step_time.py);
DeepSeek-V3 is printed for reference.

Then `mispo plan recipes/step3p5_flash/math_expert.yaml`'s step-time rows: ZeRO-3 (the recipe) against
EP8 + ZeRO-3, with the released config.json (mispo/models/step3p5/configs/step3p5_flash.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mispo.plan.step_time import NEMO_RL_V06, predict_published  # noqa: E402

PHASES = ("generation", "logprobs", "update", "critic", "refit")


def calibration() -> list[dict]:
    rows = []
    for run in NEMO_RL_V06:
        p = predict_published(run)
        rows.append({"model": run.name, "recipe": run.recipe, "gpus": run.gpus, **p})
    return rows


def flash_prediction() -> dict:
    from mispo.plan import plan_file

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(ROOT / "mispo/models/step3p5/configs/step3p5_flash.json", Path(d) / "config.json")
        plan = plan_file(ROOT / "recipes/step3p5_flash/math_expert.yaml", [f"model.path={d}"])
    return plan.step_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = calibration()
    print("NeMo-RL v0.6, H100 BF16, on-policy GRPO, colocated (tokens/s/GPU = step tokens / (step s x GPUs))")
    print(f"{'model':<16} {'GPUs':>5} {'published':>10} {'predicted':>10} {'ratio':>6} | {'step s pub':>10} "
          f"{'pred':>7} | " + " ".join(f"{k:>10}" for k in PHASES))
    for r in rows:
        print(f"{r['model']:<16} {r['gpus']:>5} {r['published_tokens_per_s_per_gpu']:>10,.1f} "
              f"{r['tokens_per_s_per_gpu']:>10,.1f} {r['ratio']:>6.2f} | {r['published_step_s']:>10,.0f} "
              f"{r['step']:>7,.0f} | " + " ".join(f"{r[k]:>10,.1f}" for k in PHASES))
    flash = flash_prediction()
    print(f"\nstep3p5_flash math_expert (196B on H100s, {flash['sequences']:,} samples x "
          f"{flash['prompt_tokens']} + {flash['mean_response']:,.0f} tokens; seconds per step)")
    print(f"{'layout':<60} {'GPUs':>5} " + " ".join(f"{k:>10}" for k in PHASES)
          + f" {'step sync':>10} {'step async':>10} {'tok/s/GPU sync':>15} {'async':>7}")
    for r in flash["layouts"]:
        name = r["layout"] + (" (recipe)" if r["configured"] else "")
        print(f"{name:<60} {r['gpus']:>5} " + " ".join(f"{r[k]:>10,.0f}" for k in PHASES)
              + f" {r['step_sync']:>10,.0f} {r['step_async']:>10,.0f} {r['tokens_per_s_per_gpu_sync']:>15,.1f}"
              f" {r['tokens_per_s_per_gpu_async']:>7,.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": rows, "step3p5_flash_math_expert": flash}, indent=1,
                                              default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
