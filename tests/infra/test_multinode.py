"""A two-node Ray cluster on this machine (a head raylet holding the custom resource `node_a`, a second raylet
joining it with `node_b`), and `mispo train` on it as a user runs it on a real cluster: `trainer.ray_address`,
`resources.node_resources: {actor: node_a, rollout: node_b}`, `resources.weight_sync: broadcast` (gloo from
learner rank 0 to the engines through the driver's TCPStore). The run's driver is killed (SIGKILL, by pid)
after step 1's checkpoint and resumed on the same cluster. Checks: the resumed run says "resumed from" and
ends at step 2; the policy learners ran on node_a and the rollout engines on node_b (the GCS actor table: node
ids differ); a resource no node holds is a clear error. The cluster is this module's own (its own temp dir and
port), started by this test (`ray start --block` as its children) and torn down by pid: those processes and
their descendants."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["warmup.steps=0", "trainer.eval_every=0", "trainer.save_every=1", "rollout.prompts_per_step=4",
         "rollout.n_samples=2", "rollout.max_new_tokens=8", "data.eval_size=8", "algorithm.advantage=grpo",
         "resources.weight_sync=broadcast", "resources.node_resources={actor: node_a, rollout: node_b}"]


def ray_env() -> dict:
    # one auth mode for the cluster and its drivers (a token in ~/.ray would otherwise turn it on for some only)
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def start_raylet(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block ARGS` as this test's child (its GCS, raylet and, later, workers are its descendants);
    returns once it says the runtime started."""
    proc = subprocess.Popen(["ray", "start", "--block", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if "Ray runtime started" in line:  # keep reading what it prints, so a full pipe never blocks it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    stop_tree([proc])
    raise AssertionError("ray start did not come up:\n" + "".join(seen[-40:]))


def stop_tree(started: list[subprocess.Popen]) -> None:
    """SIGKILL the processes this test started, by pid, and every descendant of theirs (GCS, raylet, workers)."""
    procs = []
    for popen in started:
        try:
            root = psutil.Process(popen.pid)
            procs += root.children(recursive=True) + [root]
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def cluster():
    """Two raylets on this machine: the head (node_a) and a second node (node_b); yields the address."""
    temp_dir = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths live under it
    port = random.randint(20000, 40000)
    env, common = ray_env(), ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    started: list[subprocess.Popen] = []
    try:
        for args in (["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                      '--resources={"node_a": 1}'],
                     [f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}']):
            started.append(start_raylet([*args, *common], env))
        yield f"127.0.0.1:{port}"
    finally:
        stop_tree(started)
        shutil.rmtree(temp_dir, ignore_errors=True)


def train_args(address: str, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mispo", "train", "recipes/math_expert.yaml", *QUICK,
            f"trainer.ray_address={address}", *extra, "--output", str(run)]


@pytest.fixture(scope="module")
def resumed(cluster, tmp_path_factory):
    """A 2-step run whose driver is SIGKILLed after step 1's checkpoint, then resumed: (run folder, the
    resumed run's CompletedProcess)."""
    base = tmp_path_factory.mktemp("multinode")
    run, env = base / "run", {**ray_env(), "MISPO_CACHE": str(base / "cache")}
    driver = subprocess.Popen(train_args(cluster, run, "trainer.max_steps=2"), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest, deadline = run / "checkpoints" / "latest", time.time() + 300
    while time.time() < deadline and driver.poll() is None and not (
            latest.exists() and latest.read_text() >= "step_000001"):
        time.sleep(0.2)
    assert driver.poll() is None, f"the run ended before step 1's checkpoint: {driver.stderr.read()[-3000:]}"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver's own session: its process, not the cluster
    driver.wait()
    driver.stderr.close()
    killed_at = latest.read_text()
    assert killed_at < "step_000002", "the run finished before it was killed"
    again = subprocess.run(train_args(cluster, run, "trainer.max_steps=2", "--resume"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    return run, again, killed_at


def actor_nodes(address: str) -> dict:
    """{actor class: [the resources node_a / node_b of the node each of its actors ran on]} and the node ids,
    from the GCS actor table (every job's actors, dead ones included), read by a driver of its own."""
    script = (
        "import json, sys, ray\n"
        "from ray._private.state import state\n"
        "ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)\n"
        "names = {n['NodeID']: [k for k in n['Resources'] if k in ('node_a', 'node_b')] for n in ray.nodes()}\n"
        "out = {}\n"
        "for a in state.actor_table(None).values():\n"
        "    node = a['Address']['NodeID']\n"
        "    out.setdefault(a['ActorClassName'], []).append([node, names.get(node)])\n"
        "print('ACTORS ' + json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, address], env=ray_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("ACTORS "))
    return json.loads(line[len("ACTORS "):])


def test_killed_run_resumes_on_the_cluster(resumed):
    run, again, killed_at = resumed
    assert "resumed from" in again.stderr and killed_at in again.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    assert (run / "final" / "config.json").exists()
    recipe = (run / "recipe.yaml").read_text()
    assert "weight_sync: broadcast" in recipe and "node_b" in recipe


def test_learners_and_engines_ran_on_their_nodes(cluster, resumed):
    actors = actor_nodes(cluster)
    policy, engines = actors.get("PolicyWorker", []), actors.get("RolloutWorker", [])
    assert len(policy) >= 2 and len(engines) >= 2, actors  # the killed run's and the resumed run's
    assert all(resources == ["node_a"] for _, resources in policy), policy
    assert all(resources == ["node_b"] for _, resources in engines), engines
    assert {node for node, _ in policy}.isdisjoint({node for node, _ in engines})


def test_a_resource_no_node_holds_is_a_clear_error(cluster, tmp_path):
    env = {**ray_env(), "MISPO_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(train_args(cluster, tmp_path / "run", "trainer.max_steps=1",
                                     "resources.node_resources={actor: node_a, rollout: node_c}"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert "resources.node_resources.rollout = 'node_c'" in message
    assert "node_a, node_b" in message and "ray start" in message
