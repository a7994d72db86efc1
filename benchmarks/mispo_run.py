"""One `python -m mispo train` in a subprocess, for the benchmarks: recipe dict in, metrics rows out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(recipe: dict, folder: Path, what: str = "mispo train") -> list[dict]:
    """Write `recipe` to folder/recipe.yaml, train into folder/run (log: folder/train.log); the rows of
    its metrics.jsonl. A failed run raises RuntimeError with the end of the log, named by `what`."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "mispo", "train", str(folder / "recipe.yaml"), "--output", str(folder / "run")]
    with open(folder / "train.log", "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join((folder / "train.log").read_text().splitlines()[-30:])
        raise RuntimeError(f"{what}: exited with {done.returncode}; the end of {folder / 'train.log'}:\n{tail}")
    return [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
