"""A run's checkpoints, safe against a kill at any moment:

    DIR/checkpoints/step_000010/      policy/ critic/ (DeepSpeed states) + trainer_state.json
    DIR/checkpoints/latest            the name of the newest complete checkpoint

A checkpoint is written into a hidden staging folder, renamed into place, and `latest` is replaced
atomically, so a run killed mid-save (Ctrl-C or SIGKILL) keeps its previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


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
        """Write trainer_state.json, move the staged folder into place, point `latest` at it, keep the
        newest `keep` checkpoints."""
        (staging / "trainer_state.json").write_text(json.dumps(state))
        final = self.folder / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tmp = self.folder / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, self.folder / "latest")
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[Path, dict] | None:
        """(folder, trainer state) of the newest complete checkpoint, or None."""
        pointer = self.folder / "latest"
        if not pointer.exists():
            return None
        folder = self.folder / pointer.read_text().strip()
        state_file = folder / "trainer_state.json"
        if not state_file.exists():
            return None
        return folder, json.loads(state_file.read_text())
