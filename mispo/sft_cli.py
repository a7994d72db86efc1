"""`mispo sft RECIPE [key=value ...] --output DIR`: supervised fine-tuning of `model.path` on the
recipe's `sft:` data (rows with `prompt` and `completion`), with the DeepSpeed policy learner.

    DIR/final/          the fine-tuned model (release format, with its tokenizer)
    DIR/metrics.jsonl   sft/loss and sft/lr per step
    DIR/recipe.yaml     the resolved recipe
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def run(args) -> int:
    from mispo.cli import USER_ERRORS
    from mispo.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.sft is None:
            raise RecipeError(f"{args.recipe}: no sft: section; fix: add sft: {{data: path.jsonl, steps: 100, "
                             "lr: 1.0e-5, batch_size: 32}} (rows need prompt and completion)")
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    output = Path(args.output or Path("runs") / f"{recipe.name}-sft")
    if (output / "final" / "config.json").exists():
        console.print(f"[red]error:[/red] {output} already holds a finished SFT run; choose another --output")
        return 2
    from transformers import AutoTokenizer

    from mispo.cluster import start_ray
    from mispo.config import dump_recipe
    from mispo.prepare_model import base_model_path
    from mispo.run_dir import RunDir
    from mispo.sft import recipe_sft_samples, run_sft

    start = time.time()
    run_dir = RunDir(output)
    (output / "recipe.yaml").write_text(dump_recipe(recipe))
    try:
        base = base_model_path(recipe)
        samples = recipe_sft_samples(recipe, recipe.sft, AutoTokenizer.from_pretrained(base))
        start_ray(recipe.trainer.ray_address)
        run_sft(base, samples, recipe.sft, recipe, output / "final", log=run_dir.log)
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    finally:
        run_dir.close()
    console.print(f"done in {time.time() - start:.0f}s: {len(samples)} examples, {recipe.sft.steps} steps; "
                  f"model in {output}/final")
    return 0
