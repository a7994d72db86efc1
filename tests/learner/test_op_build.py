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


def test_a_lock_removed_while_checking_is_no_error(tmp_path):
    """Another rank's build removes its lock between the listing and the stat (a broken link is such a
    lock: listed, gone when read); seen in CI with two learner ranks starting together."""
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").symlink_to(tmp_path / "gone")
    check_stale_locks(tmp_path)
