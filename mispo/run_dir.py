"""A run's output folder: resolved recipe, metrics.jsonl, TensorBoard events, checkpoints.

    DIR/recipe.yaml                      the resolved recipe
    DIR/metrics.jsonl                    one JSON object per step: {"step": n, "reward/mean": ...}
    DIR/tensorboard/                     the same scalars as TensorBoard events
    DIR/checkpoints/step_000010/         policy/ critic/ (DeepSpeed) + trainer_state.json
    DIR/checkpoints/latest               name of the newest complete checkpoint
    DIR/final/                           the trained policy in Hugging Face / release format

Checkpoints are written to a temporary folder and renamed into place, and `latest` is replaced
atomically, so a run killed at any moment (Ctrl-C or SIGKILL) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"  # created by the first checkpoint
        self._writer = None

    # ------------------------------------------------------------------ metrics
    def log(self, step: int, metrics: dict) -> None:
        """Append one line to metrics.jsonl (finite numbers only) and the TensorBoard events."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for k, v in clean.items():
                writer.add_scalar(k, v, step)
            writer.flush()

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self._writer = False
                return None
            self._writer = SummaryWriter(str(self.path / "tensorboard"))
        return self._writer or None

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines after `last_step` (steps a killed run logged past its last checkpoint)."""
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return
        lines = [ln for ln in file.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
        tmp = file.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, file)

    def close(self) -> None:
        if self._writer:
            self._writer.close()

    # ------------------------------------------------------------------ checkpoints
    def staging(self, step: int) -> Path:
        tmp = self.checkpoints / f".step_{step:06d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, staging: Path, step: int, state: dict, keep: int) -> Path:
        """Write trainer_state.json, move the staged folder into place, point `latest` at it."""
        (staging / "trainer_state.json").write_text(json.dumps(state))
        final = self.checkpoints / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tmp = self.checkpoints / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, self.checkpoints / "latest")
        done = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[Path, dict] | None:
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        state_file = folder / "trainer_state.json"
        if not state_file.exists():
            return None
        return folder, json.loads(state_file.read_text())
