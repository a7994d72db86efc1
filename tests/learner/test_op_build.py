"""DeepSpeed op builds: a per-installation folder, and a stale lock is an error naming the file."""

import os
import sys
import time

import pytest

from mispo.learner.op_build import check_stale_locks, extensions_dir, prepare_extension_builds


def test_stale_lock_is_an_error_naming_the_file(tmp_path, monkeypatch):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    prepare_extension_builds()  # a fresh lock: a build may be running, so wait on it as torch does
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match=f"minutes old: {lock}.*rm {lock}"):
        prepare_extension_builds()
    lock.unlink()
    check_stale_locks(tmp_path)


def test_builds_go_to_a_folder_of_this_installation(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = extensions_dir()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    assert extensions_dir() != here and extensions_dir().parent == here.parent
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere")
    assert str(extensions_dir()) == "/somewhere"


def test_a_lock_removed_while_checking_is_no_error(tmp_path, monkeypatch):
    """Another rank's build removes its lock between the listing and the stat (seen in CI with two
    learner ranks starting together): the lock is gone by the time it is read."""
    import pathlib

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    stat, calls = pathlib.Path.stat, []

    def removed_after_listing(self, *args, **kwargs):
        if self == lock:
            calls.append(self)
            if len(calls) == 2:  # the glob's existence check was the first: the other build finishes now
                os.unlink(self)
        return stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", removed_after_listing)
    check_stale_locks(tmp_path)
    assert len(calls) == 2 and not lock.exists()  # it was listed, then read after its removal
