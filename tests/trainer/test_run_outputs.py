"""Run outputs: metrics lines and their truncation; atomic, pruned checkpoints."""

import json

import pytest

from mispo.weights.checkpoint_store import CheckpointStore
from mispo.loop.metrics_log import MetricsLog


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


class _Crash(Exception):
    pass


def _commit_crashing_at(store, k, step, state):
    """commit(), killed just before its k-th file-system change (rename or delete); every change is
    preceded by a check that `latest` names a complete checkpoint. True when the commit finished."""
    import os
    import shutil

    import mispo.weights.checkpoint_store as cs

    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def guarded(real):
        def op(*args, **kwargs):
            assert store.latest() is not None, f"no valid latest before file-system change {calls['n']}"
            if calls["n"] == k:
                raise _Crash
            calls["n"] += 1
            return real(*args, **kwargs)
        return op

    staging = store.staging(step)
    (staging / "policy.bin").write_text(json.dumps(state))
    cs.os.replace, cs.shutil.rmtree = guarded(real_replace), guarded(real_rmtree)
    try:
        store.commit(staging, step, state, keep=2)
        return True
    except _Crash:
        return False
    finally:
        cs.os.replace, cs.shutil.rmtree = real_replace, real_rmtree


def test_saving_one_step_twice_never_leaves_latest_invalid(tmp_path):
    """A resumed run saves the step it resumed at again: a kill at any moment of that commit leaves
    `latest` naming a complete checkpoint (the old copy or the new one), and a finished commit the new."""
    for k in range(10):
        store = CheckpointStore(tmp_path / f"run{k}" / "checkpoints")
        for step in (9, 10):
            staging = store.staging(step)
            store.commit(staging, step, {"step": step, "copy": "old"}, keep=2)
        finished = _commit_crashing_at(store, k, 10, {"step": 10, "copy": "new"})
        folder, state = store.latest()
        assert state["step"] == 10 and state["copy"] in ("old", "new")
        if finished:
            assert state["copy"] == "new" and (folder / "policy.bin").exists()
            assert sorted(p.name for p in store.folder.glob("step_*")) == ["step_000009", folder.name]
            # and a third save of the same step still works
            store.commit(store.staging(10), 10, {"step": 10, "copy": "third"}, keep=2)
            assert store.latest()[1]["copy"] == "third"
            assert len(list(store.folder.glob("step_*"))) == 2


def test_save_decision_every_n_steps_and_always_at_the_end():
    from mispo.weights.checkpoint_store import final_save, periodic_save

    assert [s for s in range(1, 11) if periodic_save(s, 4)] == [4, 8]
    assert not any(periodic_save(s, 0) for s in range(1, 11))  # 0 = only at the end
    assert final_save(2, None)  # save_every 0, max_steps 2: the end save runs
    assert final_save(10, 8) and not final_save(8, 8)  # not twice for the same step
    assert not final_save(0, None)  # nothing trained, nothing to save


@pytest.mark.parametrize("save_every, max_steps, saved", [(0, 2, [2]), (2, 4, [2, 4]), (3, 4, [3, 4])])
def test_the_loop_leaves_a_checkpoint_whatever_save_every(tmp_path, monkeypatch, save_every, max_steps, saved):
    """Trainer.fit with its engines and learners stubbed: `save_every: 0` still writes checkpoints/latest
    at the end (so a rerun is refused and --resume has something), no step is saved twice, and
    `keep_checkpoints` prunes the older ones."""
    import mispo.loop.trainer as trainer_mod
    from mispo.batch import Sample
    from mispo.config import load_recipe

    class Stub:
        def __init__(self, **methods):
            self.__dict__.update(methods)

    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    t.recipe = load_recipe(None, [f"trainer.save_every={save_every}", f"trainer.max_steps={max_steps}",
                                  "trainer.eval_every=0", "trainer.loggers=[]", "trainer.keep_checkpoints=1"])
    t.output, t.step, t.ahead, t.saved_step, t.critic, t.band = tmp_path, 0, 0, None, None, None
    t.rollouts_started, t.samplers = 0, {}
    from collections import deque
    t.redrawn = deque()
    t.checkpoints = CheckpointStore(tmp_path / "checkpoints")
    t.metrics_log = MetricsLog(tmp_path, [])
    t.policy = Stub(submit=lambda *a: [], all=lambda *a: None, wait=lambda refs, method: refs)
    t.tokenizer = Stub(save_pretrained=lambda *a: None)
    t.probe = Stub(start=lambda: {})  # the weight-sync probe (mispo.loop.sync_guard)
    one = Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[-1.0], loss_mask=[1], finish_reason="stop")
    t._maybe_resume = lambda: None
    t.start_rollout = lambda: None
    t.finish_rollout = lambda pending: ([("d", [one])], {"rollout/dropped_stale": 0.0})
    t.score = lambda by_domain: {}
    t.train_step = lambda by_domain: {}
    commits = []
    real_commit = t.checkpoints.commit
    t.checkpoints.commit = lambda staging, step, state, keep: commits.append(step) or real_commit(staging, step,
                                                                                                  state, keep)
    monkeypatch.setattr(trainer_mod.ray, "get", lambda refs, timeout=None: refs)
    t.fit()
    assert commits == saved
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{max_steps:06d}"
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == [f"step_{max_steps:06d}"]  # keep 1


def test_a_full_disk_during_a_save_is_a_clear_error_that_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from mispo.weights.checkpoint_store import CheckpointWriteError

    store = CheckpointStore(tmp_path / "checkpoints")
    store.commit(store.staging(1), 1, {"step": 1}, keep=2)
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):  # the disk fills up as step 2's state is written
        if self.name == "trainer_state.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    staging = store.staging(2)
    (staging / "policy.bin").write_bytes(b"half")
    with pytest.raises(CheckpointWriteError, match=r"saving step 2 into .*checkpoints failed: the disk is full; "
                                                   r"the last complete checkpoint, step_000001, is kept\. Fix: "
                                                   r"free space .* --resume"):
        store.commit(staging, 2, {"step": 2}, keep=2)
    monkeypatch.undo()
    folder, state = store.latest()
    assert folder.name == "step_000001" and state == {"step": 1}
    assert not staging.exists() and sorted(p.name for p in store.folder.iterdir()) == ["latest", "step_000001"]
