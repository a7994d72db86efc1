"""`mispo train RECIPE [key=value ...] --output DIR [--resume]`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def run(args) -> int:
    from mispo.config import RecipeError, load_recipe
    from mispo.data import DataError
    from mispo.plugins import PluginError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (RecipeError, DataError, PluginError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    output = Path(args.output or Path("runs") / recipe.name)
    if (output / "checkpoints" / "latest").exists() and not args.resume:
        console.print(f"[red]error:[/red] {output} already holds a run; pass --resume to continue it, "
                      "or choose another --output")
        return 2
    from mispo.trainer import Trainer

    start = time.time()
    trainer = None
    try:
        trainer = Trainer(recipe, output)
        final = trainer.fit()
    except (RecipeError, DataError, PluginError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if trainer is not None:
            trainer.shutdown()
    console.print(f"done in {time.time() - start:.0f}s: {output}/metrics.jsonl, final policy in {output}/final"
                  + (f", eval/accuracy {final['eval/accuracy']:.3f}" if "eval/accuracy" in final else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run(None))
