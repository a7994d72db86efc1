"""A run's metrics: DIR/metrics.jsonl (one JSON object per step: {"step": n, "reward/mean": ...}) and
the same scalars as TensorBoard events in DIR/tensorboard/ (when tensorboard is installed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = self.folder / "metrics.jsonl"
        self._writer = None

    def log(self, step: int, metrics: dict) -> None:
        """Append one line to metrics.jsonl (finite numbers only) and the TensorBoard events."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with open(self.file, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for k, v in clean.items():
                writer.add_scalar(k, v, step)
            writer.flush()

    def rows(self) -> list[dict]:
        """Every logged line, in order."""
        if not self.file.exists():
            return []
        return [json.loads(ln) for ln in self.file.read_text().splitlines() if ln.strip()]

    def truncate(self, last_step: int) -> None:
        """Drop metric lines after `last_step` (steps a killed run logged past its last checkpoint)."""
        if not self.file.exists():
            return
        kept = [row for row in self.rows() if row["step"] <= last_step]
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.file)

    def close(self) -> None:
        if self._writer:
            self._writer.close()

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self._writer = False
                return None
            self._writer = SummaryWriter(str(self.folder / "tensorboard"))
        return self._writer or None
