"""Run folder: metrics lines, atomic checkpoints, pruning, truncation of steps past a checkpoint."""

import json

from mispo.run_dir import RunDir


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest() is None
    for step in (1, 2, 3):
        staging = run.staging(step)
        (staging / "policy.bin").write_text(str(step))
        run.commit(staging, step, {"step": step}, keep=2)
    folder, state = run.latest()
    assert folder.name == "step_000003" and state == {"step": 3}
    assert sorted(p.name for p in run.checkpoints.glob("step_*")) == ["step_000002", "step_000003"]
    run.staging(4)  # a crash while writing step 4 leaves only a hidden staging folder behind
    assert run.latest()[0].name == "step_000003"


def test_metrics_lines_and_truncation(tmp_path):
    run = RunDir(tmp_path)
    for step in range(5):
        run.log(step, {"reward/mean": step / 10, "bad": float("nan"), "text": "skipped"})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 4] and "bad" not in lines[0] and "text" not in lines[0]
    run.truncate_metrics(2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    run.close()
