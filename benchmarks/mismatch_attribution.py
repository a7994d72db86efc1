"""Where the train/inference gap comes from: MIS-PO runs of the off-policy study's task with
`trainer.mismatch_attribution` on, one per source of mismatch and one with two of them.

    python benchmarks/mismatch_attribution.py                 # 4 conditions x 10 steps, ~10 min on 2 cores
    python benchmarks/mismatch_attribution.py --steps 4 --conditions bf16,stale4

Conditions (the study's recipe, benchmarks/offpolicy.py, seed 0, its cached warm-up):
    fp32         fp32 engines and learner, sync: only kernel differences
    bf16         bf16 engines against the fp32 learner, sync: precision (and the routing it flips)
    stale4       fp32, async with max_staleness 4: staleness
    bf16_stale4  both

Per step the run logs mismatch/total = mean |log pi_old - log pi_rollout| and its parts
mismatch/from_staleness (the learner now vs the learner at the weights that sampled each token) and
mismatch/from_engine (the learner vs the engine at the same weights). Printed: their means over the steps;
written: benchmarks/results/mismatch_attribution.json and .png (one panel per condition, log scale).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from benchmarks.mispo_run import train  # noqa: E402
from benchmarks.offpolicy import recipe  # noqa: E402

RESULTS = HERE / "results" / "mismatch_attribution.json"
PLOT = HERE / "results" / "mismatch_attribution.png"
CONDITIONS = {"fp32": {}, "bf16": {"rollout": {"dtype": "bfloat16"}},
              "stale4": {"trainer": {"mode": "async", "max_staleness": 4}},
              "bf16_stale4": {"rollout": {"dtype": "bfloat16"}, "trainer": {"mode": "async", "max_staleness": 4}}}
PARTS = ("mismatch/total", "mismatch/from_staleness", "mismatch/from_engine")


def run(condition: str, steps: int, warmup_steps: int, work: Path) -> list[dict]:
    """One MIS-PO run of the study's recipe under `condition`, attribution on; its per-step rows."""
    r = recipe("mispo", "fp32", 0, steps, warmup_steps, 3e-4)
    r["name"] = f"attribution-{condition}"
    r["trainer"].update(eval_every=0, mismatch_attribution=True)
    for section, keys in CONDITIONS[condition].items():
        r[section] = {**r[section], **keys}
    shutil.rmtree(work / condition / "run", ignore_errors=True)  # a fresh run each time (this script's own folder)
    rows = train(r, work / condition, f"attribution/{condition}")
    return [{k: row[k] for k in ("step", "rollout/staleness", *PARTS) if k in row} for row in rows if "step" in row
            and PARTS[0] in row]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=True, squeeze=False)
    for ax, (condition, rows) in zip(axes[0], results.items()):
        for key, style in zip(PARTS, ("-", "--", ":")):
            ax.plot([r["step"] for r in rows], [max(r[key], 1e-9) for r in rows], style, label=key.split("/")[1])
        ax.set_yscale("log")
        ax.set_title(condition)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("mean |log ratio|")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=1000, help="the study's cached warm-up")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mismatch_attribution")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    conditions = args.conditions.split(",")
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        parser.error(f"unknown condition {unknown[0]!r}; choose from {', '.join(CONDITIONS)}")
    results = {c: run(c, args.steps, args.warmup_steps, args.work) for c in conditions}
    print(f"{'condition':<12} {'staleness':>9} {'total':>9} {'from_staleness':>14} {'from_engine':>11}")
    for c, rows in results.items():
        mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in ("rollout/staleness", *PARTS)}
        print(f"{c:<12} {mean['rollout/staleness']:>9.2f} {mean[PARTS[0]]:>9.2e} {mean[PARTS[1]]:>14.2e} "
              f"{mean[PARTS[2]]:>11.2e}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"note": "python benchmarks/mismatch_attribution.py; see its docstring",
                                       "steps": args.steps, "runs": results}, indent=1) + "\n")
    plot(results, args.plot)
    print(f"written to {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
