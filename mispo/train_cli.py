"""`mispo train RECIPE [key=value ...] --output DIR [--resume]`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def run(args) -> int:
    from mispo.cli import USER_ERRORS
    from mispo.config import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    output = Path(args.output or Path("runs") / recipe.name)
    if recipe.pipeline is not None:
        return run_pipeline(recipe, output)
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
    except USER_ERRORS as exc:
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


def run_pipeline(recipe, output: Path) -> int:
    """A recipe with pipeline: runs its stages; rerunning continues where it stopped (no --resume needed)."""
    from mispo.cli import USER_ERRORS
    from mispo.pipeline import Pipeline

    start = time.time()
    try:
        results = Pipeline(recipe, output).run()
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: rerun the same command to continue from the unfinished stage[/yellow]")
        return 130
    console.print(f"done in {time.time() - start:.0f}s: {output}/eval.json, {output}/eval.png")
    from mispo.cli import print_scores

    print_scores(console, results)
    return 0


if __name__ == "__main__":  # `python -m mispo.train_cli ARGS` is `mispo train ARGS`
    from mispo.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
