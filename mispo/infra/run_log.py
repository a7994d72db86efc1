"""Where a run's output goes. Quiet (`mispo train`'s default): the terminal shows mispo's own messages
(its console lines, `mispo.*` log warnings, Python warnings raised in mispo's code), the progress bar
and errors, while the library output of the driver (Ray, transformers, vLLM, DeepSpeed loggers, other
Python warnings) and everything the Ray workers write (stdout and stderr: Python, C++ and progress bars
alike) go to RUN/logs/run.log.
Verbose (`--verbose`): nothing is configured here, every line reaches the terminal as Ray prints it.

An exception raised inside an actor still reaches the terminal: Ray returns it to the driver
(`RayTaskError` / `ActorDiedError`, with the actor's traceback and message), which raises it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

LOG_ENV = "MISPO_RUN_LOG"  # the log file, for the workers' setup hook (set in the job's runtime_env)
WORKER_HOOK = "mispo.infra.run_log.redirect_worker_output"  # Ray's worker_process_setup_hook


def run_log_file(output: str | Path) -> Path:
    return Path(output).resolve() / "logs" / "run.log"


def quiet_driver(log_file: Path) -> None:
    """This process's library logging and Python warnings into `log_file`; warnings of `mispo.*` loggers
    and Python warnings raised in mispo's code stay on stderr too. Call before Ray starts, then
    `cluster.start_ray(..., log_file=log_file)`."""
    # trainer.loggers (unless set): W&B prints only where its run is, MLflow leaves its loggers to us;
    # first, since importing DeepSpeed imports MLflow when it is installed
    os.environ.setdefault("WANDB_QUIET", "true")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(to_file)
    root.setLevel(logging.INFO)
    own = logging.StreamHandler(sys.stderr)  # what Python's last-resort handler printed before
    own.setLevel(logging.WARNING)
    logging.getLogger("mispo").addHandler(own)
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> the file
    own_warnings = logging.StreamHandler(sys.stderr)
    own_warnings.terminator = ""  # a formatted warning ends with its newline
    own_warnings.addFilter(_from_mispo)
    logging.getLogger("py.warnings").addHandler(own_warnings)
    # Ray: importing it gives the "ray" logger a stderr handler and no propagation; ray.init(
    # configure_logging=False) drops the handler, and its records then go up to the file handler
    import ray  # noqa: F401

    logging.getLogger("ray").propagate = True
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    import datasets  # its "Generating train split" bars for local data files

    datasets.disable_progress_bars()
    # DeepSpeed: its "DeepSpeed" logger prints to stdout from import on; naming the accelerator (as the
    # actors get it) spares the import's detection warning, then the logger goes to the file
    from mispo.infra.accelerator import deepspeed_env

    os.environ.update(deepspeed_env())
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.handlers.clear()
    deepspeed_logger.propagate = True


def _from_mispo(record: logging.LogRecord) -> bool:
    """A captured Python warning raised in mispo's code ("<file>:<line>: <Category>: <message>")."""
    first = record.getMessage().split("\n", 1)[0]
    return first.startswith(str(Path(__file__).parents[1]) + os.sep) or "Warning: mispo" in first  # the package


def worker_runtime_env(log_file: Path) -> dict:
    """The Ray job runtime_env entries that send every worker's output to `log_file`."""
    return {"worker_process_setup_hook": WORKER_HOOK, "env_vars": {LOG_ENV: str(log_file)}}


@contextlib.contextmanager
def output_into(log_file: Path):
    """Within the context this process's stdout and stderr file descriptors append to `log_file` (an engine
    running in this process: vLLM's prints, C++ warnings and progress bars); restored on exit."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def redirect_worker_output() -> None:
    """Ray worker_process_setup_hook: this worker process's stdout and stderr file descriptors are
    appended to $MISPO_RUN_LOG (what Ray would otherwise stream to the driver's terminal)."""
    path = Path(os.environ[LOG_ENV])
    path.parent.mkdir(parents=True, exist_ok=True)  # another node of the cluster
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"---- Ray worker pid={os.getpid()} ----", flush=True)
