"""`mispo merge RECIPE [key=value ...] --output DIR`: distil the recipe's `merge.experts` into the
student `model.path` (see mispo.distill.merge for the stages and outputs)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def run(args) -> int:
    from mispo.cli import USER_ERRORS
    from mispo.config import load_recipe

    start, merge = time.time(), None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        output = Path(args.output or Path("runs") / recipe.name)
        from mispo.distill.merge import Merge

        merge = Merge(recipe, output)  # every check runs here, before any engine starts
        results = merge.run()
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: rerun the same command to continue (sampled data is kept)[/yellow]")
        return 130
    finally:
        if merge is not None:
            merge.close()
    console.print(f"done in {time.time() - start:.0f}s: merged model in {output}/model")
    from mispo.cli import print_scores

    print_scores(console, results)
    return 0
