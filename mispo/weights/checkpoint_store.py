"""A run's checkpoints, safe against a kill at any moment:

    DIR/checkpoints/step_000010/      policy/ critic/ (DeepSpeed states) + trainer_state.json
    DIR/checkpoints/latest            the name of the newest complete checkpoint

A checkpoint is written into a hidden staging folder, renamed into place, and `latest` is replaced
atomically, so a run killed mid-save (Ctrl-C or SIGKILL) keeps its previous checkpoint intact. The
folder `latest` names is never renamed or deleted while it names it: a step saved twice (a resumed run
saving the step it resumed at) is committed under a second name, `step_000010_1`, and the older copy
is deleted only after `latest` points at the new one.

When the trainer saves (`trainer.save_every`): `periodic_save` after each step, `final_save` once the
loop ends (time limit, max_steps), so every run leaves a checkpoint to resume from.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the previous one is kept."""


def write_failure(folder: Path, step: int, exc: OSError, previous: str | None) -> CheckpointWriteError:
    """The error a user reads when saving step `step` into `folder` failed with `exc`."""
    why = "the disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
    kept = f"the last complete checkpoint, {previous}, is kept" if previous else "no earlier checkpoint exists"
    return CheckpointWriteError(exc.errno, f"saving step {step} into {folder} failed: {why}; {kept}. Fix: free "
                                f"space there (or give --output on another disk), then continue with --resume")


def periodic_save(step: int, save_every: int) -> bool:
    """Save after step `step`? Every `save_every` steps; 0 = only at the end (`final_save`)."""
    return save_every > 0 and step % save_every == 0


def final_save(step: int, last_saved: int | None) -> bool:
    """Save when the loop ends at step `step`, the last checkpoint being of step `last_saved` (None:
    none yet)? Whenever a step was taken since, whatever `trainer.save_every` is."""
    return step > 0 and step != last_saved


class CheckpointStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)  # created by the first checkpoint

    def staging(self, step: int) -> Path:
        """An empty folder to write step `step`'s states into, then `commit`."""
        tmp = self.folder / f".step_{step:06d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, staging: Path, step: int, state: dict, keep: int) -> Path:
        """Write trainer_state.json, move the staged folder into place, point `latest` at it, then delete
        older copies of the same step and keep the newest `keep` checkpoints. At every moment `latest`
        names a complete checkpoint (the previous one until the new one is in place). A write that fails (a
        full disk) removes the staged folder and raises CheckpointWriteError; `latest` is untouched."""
        pointed = self._pointed()
        try:
            (staging / "trainer_state.json").write_text(json.dumps(state))
        except OSError as exc:
            self.discard(staging)
            raise write_failure(self.folder, step, exc, pointed) from exc
        names = [f"step_{step:06d}", f"step_{step:06d}_1"]  # a step saved twice alternates between two names
        name = next(n for n in names if n != pointed)
        final = self.folder / name
        if final.exists():  # an older copy that `latest` does not name
            shutil.rmtree(final)
        os.replace(staging, final)
        tmp = self.folder / "latest.tmp"
        try:
            tmp.write_text(final.name)
        except OSError as exc:  # `latest` still names the previous checkpoint, which is still there
            raise write_failure(self.folder, step, exc, pointed) from exc
        os.replace(tmp, self.folder / "latest")
        for other in names:
            if other != name and (self.folder / other).exists():
                shutil.rmtree(self.folder / other)
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def discard(self, staging: Path) -> None:
        """Remove a staged folder whose save failed (it never becomes a checkpoint)."""
        shutil.rmtree(staging, ignore_errors=True)

    def _pointed(self) -> str | None:
        """The folder name `latest` holds, or None."""
        pointer = self.folder / "latest"
        return pointer.read_text().strip() if pointer.exists() else None

    def latest(self) -> tuple[Path, dict] | None:
        """(folder, trainer state) of the newest complete checkpoint, or None."""
        name = self._pointed()
        if name is None:
            return None
        folder = self.folder / name
        state_file = folder / "trainer_state.json"
        if not state_file.exists():
            return None
        return folder, json.loads(state_file.read_text())
