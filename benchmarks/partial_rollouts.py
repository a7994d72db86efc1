"""Async training with and without partial rollouts, on the same model, prompts and batch, one after the
other in one run.

    python benchmarks/partial_rollouts.py                          # medium Llama, 6 steps, 32-token segments
    python benchmarks/partial_rollouts.py --config tiny --steps 3 --segment 4

Both sides run `mispo train` with vs_trl.py's model, prompts, reward and optimizer, trainer.mode async with
max_staleness 1, and MIS-PO (a loss that corrects each token against the engine's log-prob, which partial
rollouts need). The partial side adds `rollout.partial_rollout_tokens: --segment`. Printed per side,
over the steps after the first: s/step, completion tok/s, the seconds a weight sync took (a sync waits
for the engines' current call: a whole rollout, or one segment), the mean staleness of samples (their
oldest token) and of tokens, and the fraction of samples whose tokens span two versions; then the
ratios partial / whole. Rows go to benchmarks/results/partial_rollouts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from benchmarks.vs_trl import CONFIGS, WARMUP_STEPS, mispo_recipe, write_model, write_prompts  # noqa: E402

RESULTS = HERE / "results" / "partial_rollouts.json"
KEYS = {"s_per_step": "time/step_s", "weight_sync_s": "time/weight_sync_s", "wait_rollout_s": "time/wait_rollout_s",
        "staleness": "rollout/staleness", "token_staleness": "rollout/token_staleness",
        "partial_frac": "rollout/partial_frac"}


def side(name: str, steps: int, segment: int | None, work: Path) -> dict:
    """One async `mispo train`; the means of KEYS over the measured steps, and completion tok/s."""
    from benchmarks.mispo_run import train

    setup = CONFIGS[name]
    model_dir = write_model(setup, work / "model") if not (work / "model").exists() else work / "model"
    prompts = work / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts)
    recipe = mispo_recipe(setup, model_dir, prompts, steps, "float32", "async")
    recipe["algorithm"] = {"policy_loss": "mispo", "advantage": "grpo", "kl_coef": 0.0}
    if segment:
        recipe["rollout"]["partial_rollout_tokens"] = segment
    rows = [r for r in train(recipe, work / ("partial" if segment else "whole")) if "time/step_s" in r]
    if len(rows) != steps:
        raise RuntimeError(f"expected {steps} logged steps, got {len(rows)}")
    measured = rows[WARMUP_STEPS:]
    out = {k: sum(r.get(m, 0.0) for r in measured) / len(measured) for k, m in KEYS.items()}
    if not segment:  # whole rollouts: every token is as old as its sample
        out["token_staleness"], out["partial_frac"] = out["staleness"], 0.0
    out["tok_per_s"] = sum(r["throughput/tokens"] for r in measured) / sum(r["time/step_s"] for r in measured)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="medium")
    parser.add_argument("--steps", type=int, default=6, help=f"steps per side (the first {WARMUP_STEPS} skipped)")
    parser.add_argument("--segment", type=int, default=32, help="rollout.partial_rollout_tokens of the partial side")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be above the {WARMUP_STEPS} warm-up step(s)")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="partial_rollouts_") as tmp:
        whole = side(args.config, args.steps, None, Path(tmp))
        partial = side(args.config, args.steps, args.segment, Path(tmp))
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"{'':<22} {'whole':>8} {'partial':>8} {'ratio':>6}")
    for key in ("s_per_step", "tok_per_s", "weight_sync_s", "wait_rollout_s", "staleness", "token_staleness",
                "partial_frac"):
        ratio = partial[key] / whole[key] if whole[key] else float("nan")
        print(f"{key:<22} {whole[key]:>8.3f} {partial[key]:>8.3f} {ratio:>6.2f}")
    row = {"config": args.config, "steps": args.steps, "segment": args.segment, "warmup_steps": WARMUP_STEPS,
           "whole": whole, "partial": partial}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"note": "python benchmarks/partial_rollouts.py; see its docstring",
                                       "rows": [row]}, indent=1) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
