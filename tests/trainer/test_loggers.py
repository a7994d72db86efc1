"""trainer.loggers: the scalars of metrics.jsonl, same names and steps, in W&B (offline run files in the
run folder) and MLflow (sqlite store in the run folder), read back with their own readers; a resumed run
continues the same W&B / MLflow run; a logger whose package is missing is an error naming the field and
the pip command."""

import json
import struct
import sys
from pathlib import Path

import pytest

from mispo.config import RecipeError, load_recipe
from mispo.loop.metrics_log import MetricsLog

STEPS = {1: {"reward/mean": 0.25, "actor/pg_loss": -0.5, "time/step_s": 2.0},
         2: {"reward/mean": 0.75, "actor/pg_loss": -0.25, "time/step_s": 1.5, "eval/accuracy": 0.5}}


def write(folder: Path, loggers: list[str], steps=STEPS) -> None:
    log = MetricsLog(folder, loggers, config={"trainer": {"seed": 3}})
    for step, metrics in steps.items():
        log.log(step, {**metrics, "not/a/number": "text", "nan": float("nan")})
    log.close()


def wandb_records(run_file: Path) -> list:
    """The protobuf records of a .wandb transaction log: wandb's 7-byte file header, then the LevelDB log
    format (32 KiB blocks of chunks, each `crc32 u32, length u16, type u8`: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:  # block padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_run(folder: Path) -> tuple[str, dict[int, dict]]:
    """(run id, {step: {name: value}}) of the only offline run in folder/wandb/."""
    import wandb

    wandb.teardown()  # run.finish() can return before wandb-core has written the offline log; this waits
    (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run.run_id, history


def test_wandb_offline_run_has_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write(tmp_path, ["wandb"])
    run_id, history = wandb_run(tmp_path)
    jsonl = {row.pop("step"): row for row in MetricsLog(tmp_path).rows()}
    assert history == jsonl == STEPS  # same names, steps and values; non-numbers and NaN left out
    assert json.loads((tmp_path / "logger_runs.json").read_text()) == {"wandb": run_id}

    # resumed: the next steps go to the same run (a second offline folder of the same run id)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "logger_runs.json").write_text(json.dumps({"wandb": run_id}))
    write(resumed, ["wandb"], {3: {"reward/mean": 1.0}})
    assert wandb_run(resumed) == (run_id, {3: {"reward/mean": 1.0}})


def test_mlflow_run_has_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write(tmp_path, ["tensorboard", "mlflow"])
    assert list((tmp_path / "tensorboard").iterdir())
    run_id = json.loads((tmp_path / "logger_runs.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    names = {k for metrics in STEPS.values() for k in metrics}
    assert set(run.data.metrics) == names
    for name in names:
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        assert history == [(step, metrics[name]) for step, metrics in STEPS.items() if name in metrics], name

    write(tmp_path, ["mlflow"], {3: {"reward/mean": 1.0}})  # resumed in the same folder: the same run
    assert [m.step for m in client.get_metric_history(run_id, "reward/mean")] == [1, 2, 3]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.parametrize("logger, pip", [("wandb", "pip install wandb"), ("mlflow", "pip install mlflow-skinny")])
def test_a_missing_logger_package_names_the_field_and_the_pip_command(tmp_path, monkeypatch, logger, pip):
    monkeypatch.setitem(sys.modules, logger, None)  # importlib finds no such module
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")  # no sqlite store needed
    with pytest.raises(RecipeError, match=rf"trainer.loggers lists {logger}.*fix: {pip}"):
        MetricsLog(tmp_path, ["tensorboard", logger])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_loggers_default_to_tensorboard_and_unknown_names_are_rejected():
    assert load_recipe("recipes/math_expert.yaml").trainer.loggers == ["tensorboard"]
    assert load_recipe("recipes/math_expert.yaml", ["trainer.loggers=[tensorboard, wandb]"]).trainer.loggers == \
        ["tensorboard", "wandb"]
    with pytest.raises(RecipeError, match="trainer.loggers"):
        load_recipe("recipes/math_expert.yaml", ["trainer.loggers=[neptune]"])
