"""A run's metrics: DIR/metrics.jsonl (one JSON object per step: {"step": n, "reward/mean": ...}) and the
same scalars, under the same names and steps, in the loggers `trainer.loggers` names:

    tensorboard  events in DIR/tensorboard/ (skipped when tensorboard is not installed)
    wandb        a Weights & Biases run, files in DIR/wandb/; project, entity and mode (online, offline)
                 from wandb's own environment variables (WANDB_PROJECT, default "mispo"; WANDB_MODE ...)
    mlflow       an MLflow run in MLFLOW_TRACKING_URI, default the sqlite store DIR/mlflow.db (MLflow's
                 file store refuses new runs), in experiment MLFLOW_EXPERIMENT_NAME (default "mispo")

A resumed run continues the same W&B / MLflow run (their ids are kept in DIR/logger_runs.json).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from mispo.config import RecipeError

LOGGERS = ("tensorboard", "wandb", "mlflow")


class MetricsLog:
    def __init__(self, folder: str | Path, loggers: list[str] | tuple[str, ...] = ("tensorboard",),
                 config: dict | None = None):
        """`loggers`: see the module docstring; `config` (the recipe as a dict) becomes the W&B run's config.
        A logger whose package is missing is a RecipeError naming trainer.loggers and the pip command."""
        self.folder = Path(folder)
        self.file = self.folder / "metrics.jsonl"
        unknown = [name for name in loggers if name not in LOGGERS]
        if unknown:
            raise RecipeError(f"trainer.loggers: unknown logger {unknown[0]!r}; "
                              f"fix: choose from {', '.join(LOGGERS)}")
        for name in loggers:
            missing = _missing_packages(name)
            if missing:
                raise RecipeError(f"trainer.loggers lists {name}, but {', '.join(missing)} is not installed; "
                                  f"fix: pip install {' '.join(missing)}, or remove {name} from trainer.loggers")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loggers, self.config = list(loggers), config
        self._writers: dict | None = None  # started on the first log: a run that fails before it starts none

    def log(self, step: int, metrics: dict) -> None:
        """Append one line to metrics.jsonl (finite numbers only) and write the same scalars to every logger."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with open(self.file, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._writers is None:
            self._writers = {name: _start(name, self.folder, self.config) for name in self.loggers}
        for writer in self._writers.values():
            if writer is not None:
                writer.log(step, clean)

    def rows(self) -> list[dict]:
        """Every logged line, in order."""
        if not self.file.exists():
            return []
        return [json.loads(ln) for ln in self.file.read_text().splitlines() if ln.strip()]

    def truncate(self, last_step: int) -> None:
        """Drop metric lines after `last_step` (steps a killed run logged past its last checkpoint). The
        loggers keep what they received: W&B ignores a step it has seen, MLflow stores a second value."""
        if not self.file.exists():
            return
        kept = [row for row in self.rows() if row["step"] <= last_step]
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.file)

    def close(self) -> None:
        for writer in (self._writers or {}).values():
            if writer is not None:
                writer.close()
        self._writers = None


def _missing_packages(name: str) -> list[str]:
    """The pip packages logger `name` needs that are not installed (tensorboard: none, it is optional)."""
    needs = {"wandb": {"wandb": "wandb"}, "mlflow": {"mlflow": "mlflow-skinny"}}.get(name, {})
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):  # the sqlite store in the run folder
        needs.update({"sqlalchemy": "sqlalchemy", "alembic": "alembic"})
    return [package for module, package in needs.items() if importlib.util.find_spec(module) is None]


def _start(name: str, folder: Path, config: dict | None):
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
            return None
        return _TensorBoard(SummaryWriter(str(folder / "tensorboard")))
    ids_file = folder / "logger_runs.json"
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    writer = _Wandb(folder, ids.get("wandb"), config) if name == "wandb" else _MLflow(folder, ids.get("mlflow"))
    ids_file.write_text(json.dumps({**ids, name: writer.run_id}))
    return writer


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """One W&B run (id `run_id`, resumed when it exists) with its files in DIR/wandb/."""

    def __init__(self, folder: Path, run_id: str | None, config: dict | None):
        import wandb

        self.run = wandb.init(dir=str(folder), project=os.environ.get("WANDB_PROJECT", "mispo"), name=folder.name,
                              id=run_id, resume="allow", config=config)
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """One MLflow run (id `run_id`, resumed when it exists) through MLflow's tracking client."""

    def __init__(self, folder: Path, run_id: str | None):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{folder.resolve() / 'mlflow.db'}")
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mispo")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(
                name, artifact_location=None if uri else (folder.resolve() / "mlflow-artifacts").as_uri())
            run_id = self.client.create_run(experiment, run_name=folder.name,
                                            tags={"mispo.run_folder": str(folder.resolve())}).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
