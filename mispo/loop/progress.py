"""A progress bar for training steps showing the numbers that matter (rich)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SHOWN = (("reward/mean", "reward"), ("eval/accuracy", "eval"), ("mispo/token_keep_frac", "tok_keep"),
         ("mispo/traj_keep_frac", "traj_keep"), ("time/step_s", "s/step"))


class StepProgress:
    def __init__(self, total: int, start: int = 0):
        self.bar = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("", total=total, completed=start)
        self.shown: dict = {}

    def update(self, step: int, metrics: dict) -> None:
        for key, label in SHOWN:
            if key in metrics:
                self.shown[label] = metrics[key]
        text = "  ".join(f"{k} {v:.3f}" for k, v in self.shown.items())
        self.bar.update(self.task, completed=step, description=text)

    def close(self) -> None:
        self.bar.stop()
