"""benchmarks/offpolicy.py: the statistics of the table (pure) and the --quick grid end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import offpolicy  # noqa: E402


def test_spikes_count_values_above_five_times_the_running_median():
    assert offpolicy.spikes([1.0, 1.0, 1.0, 4.9, 5.1, 1.0]) == 1
    assert offpolicy.spikes([1.0, 1.0, 9.0]) == 0  # fewer than 3 steps of history
    assert offpolicy.spikes([1.0, 2.0, 3.0, 11.0, 30.0]) == 2  # medians 2 then 2.5: 11 > 10, 30 > 12.5
    assert offpolicy.spikes([]) == 0


def test_percentile_interpolates_between_order_statistics():
    assert offpolicy.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert offpolicy.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert offpolicy.percentile([5.0], 99) == 5.0


def test_run_summary_reads_the_losses_own_keep_metric():
    rows = [{"step": 0, "eval/accuracy": 0.1},
            {"step": 1, "time/step_s": 1.0, "reward/mean": 0.2, "actor/grad_norm_max": 1.0, "ppo/clip_frac": 0.1,
             "mismatch/log_ratio_abs_mean": 1e-3, "rollout/staleness": 2.0, "rollout/dropped_stale": 1},
            {"step": 2, "time/step_s": 3.0, "reward/mean": 0.6, "actor/grad_norm_max": 2.0, "ppo/clip_frac": 0.3,
             "mismatch/log_ratio_abs_mean": 3e-3, "rollout/staleness": 4.0, "rollout/dropped_stale": 2,
             "eval/accuracy": 0.5}]
    s = offpolicy.run_summary(rows, "tis")
    assert (s["first_eval"], s["final_eval"]) == (0.1, 0.5)
    assert s["reward_auc"] == pytest.approx(0.4) and s["s_per_step"] == pytest.approx(2.0)
    assert s["keep"] == pytest.approx(0.8)  # 1 - mean clip fraction
    assert s["traj_keep"] is None and s["dropped_stale"] == 3 and s["staleness"] == pytest.approx(3.0)
    mispo_rows = [{**r, "mispo/keep_frac": 0.9} for r in rows]
    assert offpolicy.run_summary(mispo_rows, "mispo")["keep"] == pytest.approx(0.9)
    cell = offpolicy.cell_summary([s, {**s, "final_eval": 0.7}])
    assert {k: cell["final_eval"][k] for k in ("mean", "min", "max", "n")} == \
        {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7, "n": 2}
    lo, hi = cell["final_eval"]["ci95"]  # mean 0.6, sd 0.1414, t(1) 12.706: 0.6 -+ 1.2706
    assert (lo, hi) == (pytest.approx(0.6 - 1.2706), pytest.approx(0.6 + 1.2706))
    assert cell["traj_keep"] is None


def test_interval_and_drift_per_version_of_lag():
    assert offpolicy.interval95([1.0]) is None
    lo, hi = offpolicy.interval95([0.5, 0.6, 0.7, 0.8, 0.9])  # sd 0.158, t(4) 2.776: +-0.196
    assert (lo, hi) == (pytest.approx(0.7 - 0.19629, abs=1e-4), pytest.approx(0.7 + 0.19629, abs=1e-4))
    rows = [{"step": 1, "time/step_s": 1.0, "lag/0/drift": 0.0, "lag/2/drift": 0.04, "lag/4+/drift": 0.2,
             "lag/ess": 0.9}]
    s = offpolicy.run_summary(rows, "mispo_decoupled")
    assert s["drift_per_version"] == pytest.approx(0.02) and s["ess"] == pytest.approx(0.9)  # 0.04 / 2; 4+ pools lags


def test_the_calibrated_condition_slows_learning_and_lengthens_the_run():
    slow = offpolicy.recipe("mispo_decoupled", "stale4_slow", 0, 24, 1000, 3e-4)
    assert slow["learner"]["actor"]["lr"] == pytest.approx(7.5e-5) and slow["trainer"]["max_steps"] == 96
    assert slow["trainer"]["max_staleness"] == 4 and slow["algorithm"]["policy_loss"] == "mispo_decoupled"
    r3 = offpolicy.recipe("mispo", "bf16_r3", 0, 24, 1000, 3e-4)["rollout"]
    assert r3["dtype"] == "bfloat16" and r3["routing_replay"] is True


def test_recipes_differ_only_in_the_algorithm_condition_and_seed():
    a = offpolicy.recipe("mispo", "fp32", 0, 24, 1000, 3e-4)
    b = offpolicy.recipe("gspo", "stale4", 1, 24, 1000, 3e-4)
    assert b["algorithm"]["policy_loss"] == "gspo" and b["algorithm"]["advantage"] == "grpo"
    assert b["trainer"]["mode"] == "async" and b["trainer"]["max_staleness"] == 4 and b["trainer"]["seed"] == 1
    for section in ("model", "warmup", "data", "reward", "learner"):
        assert a[section] == b[section]
    assert offpolicy.recipe("mispo", "bf16", 0, 24, 1000, 3e-4)["rollout"]["dtype"] == "bfloat16"
    assert "dtype" not in a["rollout"]


@pytest.mark.slow
def test_quick_grid_writes_the_table_and_the_plot(tmp_path):
    out, png = tmp_path / "offpolicy.json", tmp_path / "offpolicy.png"
    subprocess.run([sys.executable, "benchmarks/offpolicy.py", "--quick", "--work", str(tmp_path / "runs"),
                    "--output", str(out), "--plot", str(png)], cwd=ROOT, check=True, timeout=1200)
    result = json.loads(out.read_text())
    cells = result["results"]["stale4"]
    assert set(cells) == {"mispo_decoupled", "grpo"}
    for algorithm, cell in cells.items():
        (run,) = cell["runs"]
        steps = [r for r in run["rows"] if "time/step_s" in r]
        assert len(steps) == 3
        assert run["rows"][0]["step"] == 0 and "eval/accuracy" in run["rows"][0]
        assert any("lag/1/tokens" in r for r in steps)  # async: samples trained a version after they were drawn
    decoupled = [r for r in cells["mispo_decoupled"]["runs"][0]["rows"] if "lag/1/tokens" in r]
    assert all("lag/1/drift" in r and "lag/ess" in r for r in decoupled)  # scored at their own version
    assert cells["mispo_decoupled"]["summary"]["traj_keep"] is not None and cells["grpo"]["summary"]["traj_keep"] is None
    assert "| stale4 | mispo_decoupled |" in result["table"] and png.stat().st_size > 10_000


def test_best_rates_pick_each_algorithms_rate_by_reward_auc_not_held_out_accuracy():
    def cell(algorithm, lr, auc, final):
        stat = lambda v: {"mean": v, "min": v, "max": v}  # noqa: E731
        return {"algorithm": algorithm, "lr": lr, "summary": {"reward_auc": stat(auc), "final_eval": stat(final)}}

    lrs = [1e-4, 1e-3]
    results = {"stale4": {offpolicy.cell_label("mispo", 1e-4, lrs): cell("mispo", 1e-4, 0.30, 0.9),
                          offpolicy.cell_label("mispo", 1e-3, lrs): cell("mispo", 1e-3, 0.40, 0.1),
                          offpolicy.cell_label("ppo", 1e-4, lrs): cell("ppo", 1e-4, 0.50, 0.2),
                          offpolicy.cell_label("ppo", 1e-3, lrs): cell("ppo", 1e-3, 0.45, 0.8)}}
    assert offpolicy.best_rates(results) == {"stale4": {"mispo": "mispo lr=0.001", "ppo": "ppo lr=0.0001"}}
    assert offpolicy.cell_label("mispo", 3e-4, [3e-4]) == "mispo"
