"""The starting policy of a run: a checkpoint directory, or the built-in tiny Step3p5, optionally
after a supervised warm-up that is run once and cached (keyed by everything that affects it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from rich.console import Console

from mispo.config import Recipe, resolve_path

CACHE = Path(os.environ.get("MISPO_CACHE", Path.home() / ".cache" / "mispo"))
console = Console(stderr=True)


def _publish(tmp: Path, path: Path) -> None:
    """Move a finished cache entry into place; if a concurrent run got there first, keep theirs."""
    try:
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_model_path(recipe: Recipe) -> Path:
    """The recipe's model.path, writing the built-in tiny checkpoint to the cache when asked for."""
    if not recipe.model.path.startswith("builtin:"):
        return resolve_path(recipe, recipe.model.path)
    if recipe.model.path != "builtin:tiny":
        raise ValueError(f"model.path = {recipe.model.path!r}: the only builtin model is builtin:tiny")
    from mispo.models.step3p5.tiny import tiny_config, write_tiny_checkpoint

    path = CACHE / f"tiny-{_key(recipe.model.tiny, recipe.trainer.seed)}"
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_checkpoint(tmp, seed=recipe.trainer.seed, config=tiny_config(**recipe.model.tiny))
        _publish(tmp, path)
    return path


def starting_policy(recipe: Recipe, run_ray_actor) -> Path:
    """The policy RL starts from: the base model, or its cached warm-up (see `warmup`)."""
    base = base_model_path(recipe)
    if recipe.warmup is None or recipe.warmup.steps <= 0:
        return base
    key = _key(str(base.resolve()), recipe.warmup.model_dump(), recipe.data.builtin, recipe.data.model_dump())
    path = CACHE / f"warmup-{key}"
    if (path / "config.json").exists():
        console.print(f"[dim]warm-up: using the cached warm-up policy {path}[/dim]")
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    run_ray_actor(base, tmp)
    _publish(tmp, path)
    return path
