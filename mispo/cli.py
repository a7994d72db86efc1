"""The `mispo` command line: one sub-command per job, each in its own module."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mispo", description="RL post-training of LLMs with MIS-PO")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="RL-train a policy with MIS-PO from a recipe")
    train.add_argument("recipe", help="recipe YAML (recipes/math_expert.yaml, ...)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20")
    train.add_argument("--output", "-o", help="run folder (default: runs/<recipe name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    train.set_defaults(run="mispo.train_cli:run")

    sft = sub.add_parser("sft", help="supervised fine-tuning of model.path on the recipe's sft: data")
    sft.add_argument("recipe", help="recipe YAML with an sft: section")
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=200")
    sft.add_argument("--output", "-o", help="run folder (default: runs/<recipe name>-sft)")
    sft.set_defaults(run="mispo.sft_cli:run")

    merge = sub.add_parser("merge", help="distil domain experts into one generalist (the recipe's merge: section)")
    merge.add_argument("recipe", help="recipe YAML with a merge: section (recipes/merge.yaml, ...)")
    merge.add_argument("overrides", nargs="*", help="dotted overrides, e.g. merge.method=on_policy")
    merge.add_argument("--output", "-o", help="output folder (default: runs/<recipe name>)")
    merge.set_defaults(run="mispo.merge_cli:run")

    gen = sub.add_parser("generate", help="sample from a checkpoint (default: the built-in tiny Step3p5)")
    gen.add_argument("model", nargs="?", help="checkpoint directory (default: built-in tiny Step3p5)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    gen.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run="mispo.generate:run")

    plan = sub.add_parser("plan", help="per-GPU memory plan of a recipe's roles (no model is allocated)")
    plan.add_argument("recipe", help="recipe YAML (recipes/step3p5_flash/math_expert.yaml, ...)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. resources.actor_gpus=64")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan.set_defaults(run="mispo.plan:run")
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input (recipe, data, plugins, filters): printed, exit code 2."""
    from mispo.config import RecipeError
    from mispo.data import DataError
    from mispo.distill.filters import FilterError
    from mispo.plugins import PluginError

    return RecipeError, DataError, PluginError, FilterError


def print_scores(console, results: dict[str, dict[str, float]]) -> None:
    """One line per model: its accuracy on each domain."""
    for model, scores in results.items():
        console.print(f"  {model:>10}: " + "  ".join(f"{d} {acc:.3f}" for d, acc in scores.items()))


def __getattr__(name: str):
    if name == "USER_ERRORS":  # imported lazily: `mispo --help` stays fast
        return _user_errors()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`--output DIR trainer.max_steps=5`)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    module_name, func = args.run.split(":")
    module = __import__(module_name, fromlist=[func])
    return getattr(module, func)(args)


if __name__ == "__main__":
    sys.exit(main())
