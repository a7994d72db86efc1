"""The off-policy study: each policy loss under each train/inference mismatch, several seeds.

    python benchmarks/offpolicy.py                  # the grid (about an hour on 2 cores)
    python benchmarks/offpolicy.py --quick          # smoke test: 2 algorithms x 1 condition x 1 seed, 2 steps
    python benchmarks/offpolicy.py --algorithms mispo,ppo --conditions bf16 --seeds 0,1,2
    python benchmarks/offpolicy.py --conditions stale4 --lr 1e-4,3e-4,1e-3   # a shared learning-rate grid

Task: builtin:chain (sums of three one-digit numbers answered with running sums and a \\boxed{}
answer, ~25 tokens), on the tiny Step3p5 MoE (hidden 128, 4 layers, 8 experts top-2) after a
cached supervised warm-up whose data is 30% boxed, 70% bare answers (the strict boxed-only rewards.math scores those 0):
RL has a format to fix and sums to get right. Every cell is one `python -m mispo train` subprocess
on the recipe `recipe(algorithm, condition, seed)` builds; only the keys below differ between cells.

Algorithms (each as published; one learning rate, shared):
    mispo_decoupled MIS-PO's bands on the engine mismatch pi_v / pi_rollout (pi_v: the learner at the weights
                    that sampled the token), the lag pi_old / pi_v weighted by min(., 2); critic (GAE)
    mispo_decoupled_grpo  the same loss on group-normalised advantages (no critic): separates the loss from
                    the advantage estimator when comparing with the group-advantage losses below
    mispo_decoupled_clip  mispo_decoupled_grpo with decoupled_clip 0.2: PPO's clip of pi_theta / pi_old on top
                    (AReaL's decoupled objective; the trust region the clipped baselines have)
    mispo           MIS-PO, fixed bands (token [0.5, 2], trajectory [0.996, 1.001]), critic (GAE)
    mispo_adaptive  MIS-PO, the trajectory band adapted to keep ~80%, critic
    ppo             PPO clip 0.2, critic
    grpo            PPO clip 0.2 on group-normalised advantages, no critic
    grpo_ds         grpo with DAPO dynamic sampling (zero-variance groups dropped and refilled)
    gspo            sequence-level ratio and clip, group advantages
    tis             PPO clip times the truncated rollout correction min(pi_old / pi_rollout, 2)
    icepop          PPO clip, tokens whose pi_old / pi_rollout leaves [0.5, 5] masked out

Conditions:
    fp32     on-policy: fp32 learner and fp32 vLLM rollouts, sync (the ratios differ only by kernels)
    bf16     vLLM rollouts in bfloat16 against the fp32 learner, sync
    bf16_r3  the same with routing replay: the learner uses the experts the engine routed each token to
    stale4   fp32, trainer.mode async with max_staleness 4 (rollouts up to 4 versions old)
    stale8   the same with max_staleness 8 (not in the default grid: --conditions stale8)
    stale4_slow  drift-calibrated staleness 4: the learning rate / 4 and 4x the steps, so each version of lag
             moves the policy about 4x less (closer to a large model at lr 1e-6); not in the default grid

Learning rates: `--lr` takes one rate or a grid, the same grid for every algorithm. With a grid each
(algorithm, rate) is a cell of its own, and a second table picks each algorithm's rate by its mean
reward AUC over seeds (the training reward, never the held-out set); the plot draws those picks.

Per run: final held-out accuracy (greedy, 50 problems never trained on), reward area under the
curve (mean of reward/mean over the steps), grad-norm p99 and spikes (steps whose pre-clip grad norm
exceeds 5x the median of the steps before it; from step 4), the loss's own keep / unclipped fraction,
mean |log pi_old / pi_rollout| and the mean staleness; with lag (async), per lag bucket k the loss's
acceptance, the ESS of its weights and (where the learner scores tokens at their own version) the drift
|log pi_old / pi_v| per version of lag. Cells: mean and spread (min..max) over seeds, and a 95% t-interval
of the held-out accuracy's mean.

Writes benchmarks/results/offpolicy.json (every run's curves and the table) and offpolicy.png
(rows: conditions; columns: reward, held-out accuracy, grad norm, |log ratio|, kept tokens; seed
bands). Runs
land in --work (default runs/offpolicy/<condition>/<algorithm>/lr<rate>/seed<k>); a finished run is reused,
so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from benchmarks.mispo_run import train  # noqa: E402

RESULTS = HERE / "results" / "offpolicy.json"
PLOT = HERE / "results" / "offpolicy.png"
SPIKE_FACTOR = 5.0
SPIKE_HISTORY = 3  # steps of history before a spike can be counted
SAVED_KEYS = ("step", "reward/mean", "eval/accuracy", "actor/grad_norm_max", "actor/kl_to_old",
              "mismatch/log_ratio_abs_mean", "mispo/keep_frac", "mispo/traj_keep_frac", "icepop/keep_frac",
              "ppo/clip_frac", "gspo/clip_frac", "rollout/staleness", "rollout/dropped_stale", "time/step_s",
              "lag/ess", "lag/weight_mean", "lag/log_ratio_abs_mean")
SAVED_PREFIXES = ("lag/",)  # the per-lag-bucket metrics

ALGORITHMS: dict[str, dict] = {
    "mispo_decoupled": {"policy_loss": "mispo_decoupled", "advantage": "gae"},
    "mispo_decoupled_grpo": {"policy_loss": "mispo_decoupled", "advantage": "grpo"},
    "mispo_decoupled_clip": {"policy_loss": "mispo_decoupled", "advantage": "grpo",
                             "loss_options": {"decoupled_clip": 0.2}},
    "mispo": {"policy_loss": "mispo", "advantage": "gae"},
    "mispo_adaptive": {"policy_loss": "mispo", "advantage": "gae", "adaptive_traj_band": True},
    "ppo": {"policy_loss": "ppo", "advantage": "gae"},
    "grpo": {"policy_loss": "grpo", "advantage": "grpo"},
    "grpo_ds": {"policy_loss": "grpo", "advantage": "grpo", "dynamic_sampling": {"max_refills": 2}},
    "gspo": {"policy_loss": "gspo", "advantage": "grpo"},
    "tis": {"policy_loss": "tis", "advantage": "grpo"},
    "icepop": {"policy_loss": "icepop", "advantage": "grpo"},
}
CONDITIONS: dict[str, dict] = {
    "fp32": {},
    "bf16": {"rollout": {"dtype": "bfloat16"}},
    "bf16_r3": {"rollout": {"dtype": "bfloat16", "routing_replay": True}},
    "stale4": {"trainer": {"mode": "async", "max_staleness": 4}},
    "stale8": {"trainer": {"mode": "async", "max_staleness": 8}},
    "stale4_slow": {"trainer": {"mode": "async", "max_staleness": 4}},
}
SLOWER = {"stale4_slow": 4}  # condition: learning rate divided by and steps multiplied by this
DEFAULT_CONDITIONS = ("fp32", "bf16", "stale4")
# the loss's own fraction of tokens it trains on (kept by a filter, or not clipped)
KEEP_METRIC = {"mispo": ("mispo/keep_frac", False), "mispo_decoupled": ("mispo/keep_frac", False), "icepop": ("icepop/keep_frac", False),
               "gspo": ("gspo/clip_frac", True)}


def recipe(algorithm: str, condition: str, seed: int, steps: int, warmup_steps: int, lr: float) -> dict:
    """The recipe of one cell; everything but `algorithm`, the condition's keys and the seed is shared."""
    slower = SLOWER.get(condition, 1)
    lr, steps = lr / slower, steps * slower
    out = {
        "name": f"offpolicy-{condition}-{algorithm}-{seed}",
        "model": {"path": "builtin:tiny", "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "sliding_window": 64}},
        "warmup": {"steps": warmup_steps, "lr": 3.0e-3, "batch_size": 32, "data": "builtin:chain"},
        "data": {"train": "builtin:chain", "eval": "builtin:chain", "eval_size": 50,
                 "builtin": {"eval_fraction": 0.2, "sft_boxed_fraction": 0.3}},
        "rollout": {"engine_kwargs": {"kv_cache_memory_bytes": 268435456}, "prompts_per_step": 8, "n_samples": 8,
                    "max_new_tokens": 40, "temperature": 1.0},
        "reward": {"plugins": [{"fn": "rewards.math:scorer", "args": {"boxed_only": True}, "name": "math"}]},
        # a response cut at 40 tokens has failed to answer: it keeps its reward (0), no bootstrap
        "algorithm": {"bootstrap_truncated": False, **ALGORITHMS[algorithm]},
        "learner": {"zero_stage": 2, "micro_batch_tokens": 8192, "actor_mini_batches": 2, "critic_mini_batches": 2,
                    "actor": {"lr": lr, "warmup_steps": 2, "weight_decay": 0.0},
                    "critic": {"lr": lr, "warmup_steps": 2, "weight_decay": 0.0}},
        "trainer": {"max_steps": steps, "eval_every": max(steps // 4, 1), "save_every": 0, "seed": seed},
    }
    for section, keys in CONDITIONS[condition].items():
        out[section] = {**out[section], **keys}
    return out


def run_cell(algorithm: str, condition: str, lr: float, seed: int, args: argparse.Namespace) -> list[dict]:
    """Train one cell (or reuse a finished run in its folder); its metrics.jsonl rows."""
    folder = args.work / condition / algorithm / f"lr{lr:g}" / f"seed{seed}"
    metrics = folder / "run" / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        if len([r for r in rows if "time/step_s" in r]) == args.steps * SLOWER.get(condition, 1):
            return rows
    return train(recipe(algorithm, condition, seed, args.steps, args.warmup_steps, lr), folder,
                 f"{condition}/{algorithm}/lr{lr:g}/seed{seed}")


# --------------------------------------------------------------------------- statistics (pure)
def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that has `key`."""
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def spikes(values: list[float], factor: float = SPIKE_FACTOR, history: int = SPIKE_HISTORY) -> int:
    """Values above `factor` x the median of all values before them (counted once `history` exist)."""
    return sum(1 for i in range(history, len(values)) if values[i] > factor * statistics.median(values[:i]))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def keep_series(rows: list[dict], algorithm: str) -> list[tuple[int, float]]:
    """(step, share of tokens the loss trains on: kept by its filter, or not clipped)."""
    key, inverted = KEEP_METRIC.get(ALGORITHMS[algorithm]["policy_loss"], ("ppo/clip_frac", True))
    return [(step, 1.0 - v if inverted else v) for step, v in series(rows, key)]


def keep_fraction(rows: list[dict], algorithm: str) -> float | None:
    """Mean over steps of keep_series."""
    values = [v for _, v in keep_series(rows, algorithm)]
    return sum(values) / len(values) if values else None


def run_summary(rows: list[dict], algorithm: str) -> dict:
    """The per-run numbers of the table (see the module docstring)."""
    steps = [r for r in rows if "time/step_s" in r]

    def mean(key: str) -> float | None:
        values = [v for _, v in series(steps, key)]
        return sum(values) / len(values) if values else None

    grads = [v for _, v in series(steps, "actor/grad_norm_max")]
    evals = series(rows, "eval/accuracy")
    drift = [v / lag_of(key) for r in steps for key, v in r.items()  # exact lags only (4+ pools several)
             if key.startswith("lag/") and key.endswith("/drift") and 0 < lag_of(key) and "+" not in key]
    return {"final_eval": evals[-1][1] if evals else None, "first_eval": evals[0][1] if evals else None,
            "reward_auc": mean("reward/mean"), "grad_p99": percentile(grads, 99) if grads else None,
            "spikes": spikes(grads), "keep": keep_fraction(steps, algorithm),
            "traj_keep": mean("mispo/traj_keep_frac"), "log_ratio": mean("mismatch/log_ratio_abs_mean"),
            "staleness": mean("rollout/staleness"), "dropped_stale": sum(v for _, v in series(steps, "rollout/dropped_stale")),
            "s_per_step": mean("time/step_s"), "ess": mean("lag/ess"),
            "drift_per_version": sum(drift) / len(drift) if drift else None}


def lag_of(key: str) -> int:
    """The lag of a per-bucket key: lag/3/drift -> 3, lag/4+/drift -> 4."""
    return int(key.split("/")[1].rstrip("+"))


T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval95(values: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean of `values` (None for fewer than 2; up to 10 values)."""
    if len(values) < 2:
        return None
    mean, half = statistics.mean(values), T975[len(values)] * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean + half


def cell_label(algorithm: str, lr: float, lrs: list[float]) -> str:
    """A cell's name in the tables: the algorithm, with its rate when the study has a grid of rates."""
    return algorithm if len(lrs) == 1 else f"{algorithm} lr={lr:g}"


def best_rates(results: dict) -> dict[str, dict[str, str]]:
    """{condition: {algorithm: label of its cell with the highest mean reward AUC}}: each algorithm's rate,
    picked on the training reward (never the held-out accuracy), from the same grid for all."""
    picks: dict[str, dict[str, str]] = {}
    for condition, cells in results.items():
        best: dict[str, tuple[float, str]] = {}
        for label, cell in cells.items():
            auc = cell["summary"]["reward_auc"]
            score = auc["mean"] if auc else float("-inf")
            if cell["algorithm"] not in best or score > best[cell["algorithm"]][0]:
                best[cell["algorithm"]] = (score, label)
        picks[condition] = {algorithm: label for algorithm, (_, label) in best.items()}
    return picks


def cell_summary(runs: list[dict]) -> dict:
    """Mean, min and max over seeds of every number of run_summary."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = ({"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                     "ci95": interval95(values), "n": len(values)} if values else None)
    return out


# --------------------------------------------------------------------------- report
def fmt(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "-"
    if stat["min"] == stat["max"]:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ({stat['min']:.{digits}f}..{stat['max']:.{digits}f})"


def table(results: dict, only: dict[str, dict[str, str]] | None = None) -> str:
    """A markdown table: one row per (condition, cell); `only` keeps the cells best_rates picked."""
    lines = ["| condition | algorithm | seeds | held-out acc (start -> end) | held-out 95% CI | reward AUC | grad p99 | "
             "spikes | kept tokens | traj keep | lag ESS | mean abs log ratio | drift per version | staleness |",
             "|" + "---|" * 14]
    for condition, cells in results.items():
        for algorithm, cell in cells.items():
            if only is not None and algorithm not in only[condition].values():
                continue
            s = cell["summary"]
            ratio = "-" if s["log_ratio"] is None else f"{s['log_ratio']['mean']:.1e}"
            drift = "-" if s.get("drift_per_version") is None else f"{s['drift_per_version']['mean']:.1e}"
            final, ci = s["final_eval"], (s["final_eval"] or {}).get("ci95")
            ci_text = "-" if ci is None else f"{ci[0]:.2f}..{ci[1]:.2f}"
            lines.append(f"| {condition} | {algorithm} | {final['n'] if final else 0} | {fmt(s['first_eval'])} -> "
                         f"{fmt(final)} | {ci_text} | {fmt(s['reward_auc'])} | {fmt(s['grad_p99'], 1)} | "
                         f"{fmt(s['spikes'], 1)} | {fmt(s['keep'])} | {fmt(s['traj_keep'])} | {fmt(s.get('ess'))} | "
                         f"{ratio} | {drift} | {fmt(s['staleness'], 1)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, only: dict[str, dict[str, str]] | None = None) -> Path:
    """Rows: conditions; columns: reward, held-out accuracy, grad norm (log), |log ratio| (log), kept tokens, the
    ESS of mispo_decoupled's lag weights; a line
    per cell (mean over seeds) with its min..max band; `only` keeps the cells best_rates picked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/mean", "reward", False), ("eval/accuracy", "held-out accuracy", False),
              ("actor/grad_norm_max", "grad norm (pre-clip)", True),
              ("mismatch/log_ratio_abs_mean", "mean |log pi_old/pi_rollout|", True),
              ("keep", "kept / unclipped tokens", False), ("lag/ess", "ESS / n of the lag weights", False)]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(4 * len(panels), 2.8 * len(results)), squeeze=False)
    for i, (condition, cells) in enumerate(results.items()):
        for j, (key, label, log) in enumerate(panels):
            ax = axes[i][j]
            for name, cell in cells.items():
                if only is not None and name not in only[condition].values():
                    continue
                curves = [dict(keep_series(run["rows"], cell["algorithm"]) if key == "keep" else series(run["rows"], key))
                          for run in cell["runs"]]
                steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if not steps:
                    continue
                values = [[c[s] for c in curves] for s in steps]
                mean = [sum(v) / len(v) for v in values]
                line, = ax.plot(steps, mean, label=name, lw=1.2)
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                                alpha=0.15, lw=0)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{condition}: {label}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def names(value: str, known: dict) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in out if v not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; known: {', '.join(known)}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", type=lambda v: names(v, ALGORITHMS), default=list(ALGORITHMS))
    parser.add_argument("--conditions", type=lambda v: names(v, CONDITIONS), default=list(DEFAULT_CONDITIONS))
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup-steps", type=int, default=1000, help="supervised warm-up steps (cached per seed)")
    parser.add_argument("--lr", type=lambda v: [float(x) for x in v.split(",")], default=[3e-4],
                        help="actor and critic learning rate, or a comma-separated grid; the same for every algorithm")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "offpolicy")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--summarise", type=Path, default=None,
                        help="re-summarise the runs saved in this results JSON (no training) and rewrite it")
    parser.add_argument("--quick", action="store_true",
                        help="mispo_decoupled and grpo, stale4, seed 0, 3 steps, 50 warm-up steps")
    args = parser.parse_args(argv)
    if args.summarise is not None:
        return summarise(args.summarise, args.plot)
    if args.quick:
        args.algorithms, args.conditions, args.seeds = ["mispo_decoupled", "grpo"], ["stale4"], [0]
        args.steps, args.warmup_steps = 3, 50
    cells = [(c, a, lr, s) for c in args.conditions for a in args.algorithms for lr in args.lr for s in args.seeds]
    print(f"{len(cells)} runs: {args.conditions} x {args.algorithms} x lr {args.lr} x seeds {args.seeds}, "
          f"{args.steps} steps; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for k, (condition, algorithm, lr, seed) in enumerate(cells, 1):
        t = time.perf_counter()
        rows = run_cell(algorithm, condition, lr, seed, args)
        label = cell_label(algorithm, lr, args.lr)
        cell = results.setdefault(condition, {}).setdefault(label, {"algorithm": algorithm, "lr": lr, "runs": []})
        kept = [{k: v for k, v in r.items() if k in SAVED_KEYS or k.startswith(SAVED_PREFIXES)} for r in rows]
        cell["runs"].append({"seed": seed, "summary": run_summary(rows, algorithm), "rows": kept})
        print(f"[{k}/{len(cells)}] {condition}/{label}/seed{seed}: {time.perf_counter() - t:.0f} s, "
              f"final eval {cell['runs'][-1]['summary']['final_eval']}", flush=True)
    for cells_of in results.values():
        for cell in cells_of.values():
            cell["summary"] = cell_summary([r["summary"] for r in cell["runs"]])
    text = table(results)
    print(text)
    picks = best_rates(results) if len(args.lr) > 1 else None
    picked = table(results, picks) if picks else None
    if picked:
        print("each algorithm at its best rate (by reward AUC):\n" + picked)
    print(f"{len(cells)} runs in {time.perf_counter() - start:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"note": "python benchmarks/offpolicy.py; see its docstring",
                                       "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                       "table": text, "best_rate_table": picked, "best_rates": picks,
                                       "results": results}) + "\n")
    print(f"written to {args.output} and {plot(results, args.plot, picks)}")


def summarise(path: Path, plot_path: Path) -> None:
    """Recompute every run's and cell's summary from the rows a results JSON keeps; rewrite its table and plot."""
    saved = json.loads(path.read_text())
    for cells in saved["results"].values():
        for cell in cells.values():
            for run in cell["runs"]:
                run["summary"] = run_summary(run["rows"], cell["algorithm"])
            cell["summary"] = cell_summary([r["summary"] for r in cell["runs"]])
    saved["table"] = table(saved["results"])
    print(saved["table"])
    path.write_text(json.dumps(saved) + "\n")
    print(f"rewritten: {path} and {plot(saved['results'], plot_path)}")


if __name__ == "__main__":
    main()
