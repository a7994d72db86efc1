"""Run outputs: metrics lines and their truncation; atomic, pruned checkpoints."""

import json

from mispo.checkpoint_store import CheckpointStore
from mispo.metrics_log import MetricsLog


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.latest() is None
    for step in (1, 2, 3):
        staging = store.staging(step)
        (staging / "policy.bin").write_text(str(step))
        store.commit(staging, step, {"step": step}, keep=2)
    folder, state = store.latest()
    assert folder.name == "step_000003" and state == {"step": 3}
    assert (folder / "policy.bin").read_text() == "3"
    assert sorted(p.name for p in store.folder.glob("step_*")) == ["step_000002", "step_000003"]
    store.staging(4)  # a crash while writing step 4 leaves only a hidden staging folder behind
    assert store.latest()[0].name == "step_000003"


def test_metrics_lines_and_truncation(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(5):
        log.log(step, {"reward/mean": step / 10, "bad": float("nan"), "text": "skipped"})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 4] and "bad" not in lines[0] and "text" not in lines[0]
    assert lines[3]["reward/mean"] == 0.3
    log.truncate(2)
    assert [row["step"] for row in log.rows()] == [0, 1, 2]
    log.close()
