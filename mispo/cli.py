"""The `mispo` command line: one function per command (train, sft, merge, generate, plan, eval), run by `main`,
which turns a user error (an invalid recipe, data, plugin or merge filter, or a run folder that refuses
the command) into `error: <message>` on stderr and exit code 2, and Ctrl-C into exit code 130.

The commands import their modules (torch, Ray, the trainer) when they run, so `mispo --help` stays fast.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path


class UsageError(Exception):
    """The command cannot run as given (e.g. --output already holds a run); the message says what to pass."""


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input, printed without a traceback (exit code 2)."""
    from mispo.config import RecipeError
    from mispo.data import DataError
    from mispo.distill.filters import FilterError
    from mispo.scoring.plugins import PluginError

    return UsageError, RecipeError, DataError, PluginError, FilterError


def _guard_errors() -> tuple[type[Exception], ...]:
    """Errors of the run's invariant guards (raised in the driver or, wrapped by Ray, in an actor)."""
    from mispo.weights.checkpoint_store import CheckpointWriteError
    from mispo.loop.dead_actor import RunStopped
    from mispo.weights.sync_checks import WeightSyncError

    return WeightSyncError, RunStopped, CheckpointWriteError


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _print_scores(results: dict[str, dict[str, float]]) -> None:
    """One line per model: its accuracy on each domain."""
    console = _stderr()
    for model, scores in results.items():
        console.print(f"  {model:>10}: " + "  ".join(f"{d} {acc:.3f}" for d, acc in scores.items()))


# --------------------------------------------------------------------------- the commands
def train(args) -> int:
    """`mispo train RECIPE [key=value ...] [--output DIR] [--resume] [--verbose]`: RL with MIS-PO, or the
    stages of a `pipeline:` recipe (rerunning it continues where it stopped, no --resume needed). The
    libraries' output goes to DIR/logs/run.log unless --verbose (`mispo.infra.run_log`)."""
    from mispo.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    output = Path(args.output or Path("runs") / recipe.name)
    if recipe.pipeline is None and (output / "checkpoints" / "latest").exists() and not args.resume:
        raise UsageError(f"{output} already holds a run; pass --resume to continue it, or choose another --output")
    start = time.time()
    with _run_output(output, recipe.trainer.ray_address, args.verbose):
        if recipe.pipeline is not None:
            return _train_pipeline(recipe, output, start)
        import shlex

        resume = shlex.join(["mispo", "train", args.recipe, *args.overrides, "--output", str(output), "--resume"])
        return _train_rl(recipe, output, start, resume)


@contextmanager
def _run_output(output: Path, ray_address: str | None, verbose: bool, log_file: Path | None = None,
                in_process: bool = False):
    """A quiet run (unless `verbose`): library logging of this process and the output of every Ray worker
    go to `log_file` (default output/logs/run.log); with `in_process` (an engine in this process, no Ray)
    this process's stdout / stderr too, while the context runs. An unexpected error points at that file."""
    if verbose:
        yield
        return
    from mispo.infra.cluster import start_ray
    from mispo.infra.run_log import output_into, quiet_driver, run_log_file

    log_file = log_file or run_log_file(output)
    quiet_driver(log_file)
    if in_process:
        _stderr().print(f"[dim]library output: {log_file} (--verbose prints it here)[/dim]")
        try:
            with output_into(log_file):
                yield
        except Exception:
            _stderr().print(f"[dim]the full log (libraries, the engine): {log_file}[/dim]")
            raise
        return
    start_ray(ray_address, log_file=log_file)
    _stderr().print(f"[dim]library output: {log_file} (--verbose prints it here)[/dim]")
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            _stderr().print(f"[dim]the run's full log (libraries, Ray actors): {log_file}[/dim]")
        raise


def _train_rl(recipe, output: Path, start: float, resume_command: str = "") -> int:
    import ray

    from mispo.infra.call_timeout import CallTimedOut
    from mispo.loop.dead_actor import RunStopped, describe, role_of
    from mispo.loop.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(recipe, output)
        final = trainer.fit()
    except (ray.exceptions.RayActorError, CallTimedOut) as exc:  # a learner died or hung past the restarts
        if role_of(exc) not in ("PolicyWorker", "CriticWorker") or getattr(exc, "actor_init_failed", False):
            raise  # an error raised in the actor (its own message says more than ours)
        raise RunStopped(describe(exc, output / "checkpoints", resume_command)) from None
    finally:
        if trainer is not None:
            trainer.shutdown()
    _stderr().print(f"done in {time.time() - start:.0f}s: {output}/metrics.jsonl, final policy in {output}/final"
                   + (f", eval/accuracy {final['eval/accuracy']:.3f}" if "eval/accuracy" in final else ""))
    return 0


def _train_pipeline(recipe, output: Path, start: float) -> int:
    from mispo.pipeline import Pipeline

    try:
        results = Pipeline(recipe, output).run()
    except KeyboardInterrupt:
        _stderr().print("[yellow]interrupted: rerun the same command to continue from the unfinished stage[/yellow]")
        raise
    _stderr().print(f"done in {time.time() - start:.0f}s: {output}/eval.json, {output}/eval.png")
    _print_scores(results)
    return 0


def sft(args) -> int:
    """`mispo sft RECIPE [key=value ...] [--output DIR] [--verbose]`: supervised fine-tuning of `model.path` on the
    recipe's `sft:` data (rows with `prompt` and `completion`) with the DeepSpeed policy learner.

        DIR/final/          the fine-tuned model (release format, with its tokenizer)
        DIR/metrics.jsonl   sft/loss and sft/lr per step
        DIR/recipe.yaml     the resolved recipe
    """
    from mispo.config import RecipeError, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.sft is None:
        raise RecipeError(f"{args.recipe}: no sft: section; fix: add sft: {{data: path.jsonl, steps: 100, "
                          "lr: 1.0e-5, batch_size: 32}} (rows need prompt and completion)")
    output = Path(args.output or Path("runs") / f"{recipe.name}-sft")
    if (output / "final" / "config.json").exists():
        raise UsageError(f"{output} already holds a finished SFT run; choose another --output")
    from transformers import AutoTokenizer

    from mispo.infra.cluster import start_ray
    from mispo.config import dump_recipe
    from mispo.loop.metrics_log import MetricsLog
    from mispo.prepare_model import base_model_path
    from mispo.sft import recipe_sft_samples, run_sft

    start = time.time()
    metrics = MetricsLog(output)
    (output / "recipe.yaml").write_text(dump_recipe(recipe))
    try:
        base = base_model_path(recipe)
        samples = recipe_sft_samples(recipe, recipe.sft, AutoTokenizer.from_pretrained(base))
        with _run_output(output, recipe.trainer.ray_address, args.verbose):
            start_ray(recipe.trainer.ray_address)
            run_sft(base, samples, recipe.sft, recipe, output / "final", log=metrics.log)
    finally:
        metrics.close()
    _stderr().print(f"done in {time.time() - start:.0f}s: {len(samples)} examples, {recipe.sft.steps} steps; "
                   f"model in {output}/final")
    return 0


def merge(args) -> int:
    """`mispo merge RECIPE [key=value ...] [--output DIR] [--verbose]`: distil the recipe's `merge.experts`
    into the student `model.path` (see mispo.distill.merge for the stages and outputs). Like `mispo sft`,
    a quiet run: the libraries' output goes to DIR/logs/run.log unless --verbose."""
    from mispo.config import load_recipe
    from mispo.distill.merge import Merge

    start, merger = time.time(), None
    recipe = load_recipe(args.recipe, args.overrides)
    output = Path(args.output or Path("runs") / recipe.name)
    try:
        merger = Merge(recipe, output)  # every check runs here, before any engine starts
        with _run_output(output, recipe.trainer.ray_address, args.verbose):
            results = merger.run()
    except KeyboardInterrupt:
        _stderr().print("[yellow]interrupted: rerun the same command to continue (sampled data is kept)[/yellow]")
        raise
    finally:
        if merger is not None:
            merger.close()
    _stderr().print(f"done in {time.time() - start:.0f}s: merged model in {output}/model")
    _print_scores(results)
    return 0


def generate(args) -> int:
    """`mispo generate [MODEL_DIR] [--prompt P ...]`: sample from a checkpoint (see mispo.generate)."""
    from rich.console import Console

    from mispo.generate import sample_completions as sample
    from mispo.generate import tiny_model_dir

    console = Console()
    model = args.model or tiny_model_dir()
    if not args.model:
        console.print(f"[dim]no model given: using the built-in tiny Step3p5 checkpoint at {model}[/dim]")
    start = time.time()
    with _run_output(Path("."), None, args.verbose, log_file=Path(args.log).resolve(), in_process=True):
        results = sample(model, args.prompt or ["12+30=", "The answer is"], engine=args.engine,
                         max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, raw=args.raw)
    for r in results:
        mean_lp = sum(r["logprobs"]) / max(len(r["logprobs"]), 1)
        console.print(f"[bold]{r['prompt']!r}[/bold] -> {r['text']!r}  "
                      f"({len(r['token_ids'])} tokens, {r['finish_reason']}, mean logprob {mean_lp:.3f})")
    console.print(f"[dim]{args.engine}: {time.time() - start:.1f}s including engine start[/dim]")
    return 0


def plan(args) -> int:
    """`mispo plan RECIPE [key=value ...] [--json]`: the per-GPU memory plan (see mispo.plan)."""
    import json

    from rich.console import Console

    from mispo.plan import plan_file, print_plan

    result = plan_file(args.recipe, args.overrides)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print_plan(result, Console(width=max(Console().width, 150)))
    return 0


def evaluate(args) -> int:
    """`mispo eval RECIPE [key=value ...] [--model DIR] [--samples K] [--json PATH]`: greedy accuracy and
    pass@k (K samples per prompt at rollout.temperature; see mispo.evaluate) of a checkpoint on the
    recipe's eval rows, per domain, on one vLLM engine. --model: any Hugging Face checkpoint folder or hub
    name (default: the recipe's model.path). Printed as a table and written as JSON to --json (default:
    DIR/eval_<recipe name>.json when --model is a local folder, else ./eval_<recipe name>.json)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from mispo.config import load_recipe

    if args.samples < 1:
        raise UsageError(f"--samples = {args.samples}: pass@k needs at least 1 sample per prompt")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.model:
        model = args.model
    else:
        from mispo.prepare_model import base_model_path

        model = str(base_model_path(recipe))
    local = args.model is not None and Path(args.model).is_dir()
    out = Path(args.json) if args.json else (Path(args.model) if local else Path(".")) / f"eval_{recipe.name}.json"
    from mispo.evaluate import evaluate_model, k_values

    start = time.time()
    with _run_output(out.parent, recipe.trainer.ray_address, args.verbose, log_file=out.with_suffix(".log").resolve()):
        report = evaluate_model(recipe, model, args.samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = Table(title=f"{recipe.name}: {model}",
                  caption=f"pass@k from {args.samples} samples per prompt at temperature {recipe.rollout.temperature}")
    ks = k_values(args.samples)
    for col in ["domain", "rows", "greedy", *(f"pass@{k}" for k in ks)]:
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, r in report["domains"].items():
        table.add_row(name, str(r["eval_rows"]), f"{r['greedy_accuracy']:.3f}", *(f"{r[f'pass@{k}']:.3f}" for k in ks))
    Console().print(table)
    _stderr().print(f"done in {time.time() - start:.0f}s: {out}")
    return 0


# --------------------------------------------------------------------------- parsing and running
VERBOSE = "print Ray's, vLLM's and DeepSpeed's output here (default: in <output>/logs/run.log)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mispo", description="RL post-training of LLMs with MIS-PO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="RL-train a policy with MIS-PO from a recipe")
    p.add_argument("recipe", help="recipe YAML (recipes/math_expert.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20")
    p.add_argument("--output", "-o", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE)
    p.set_defaults(func=train)

    p = sub.add_parser("sft", help="supervised fine-tuning of model.path on the recipe's sft: data")
    p.add_argument("recipe", help="recipe YAML with an sft: section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=200")
    p.add_argument("--output", "-o", help="run folder (default: runs/<recipe name>-sft)")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE)
    p.set_defaults(func=sft)

    p = sub.add_parser("merge", help="distil domain experts into one generalist (the recipe's merge: section)")
    p.add_argument("recipe", help="recipe YAML with a merge: section (recipes/merge.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. merge.method=on_policy")
    p.add_argument("--output", "-o", help="output folder (default: runs/<recipe name>)")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE)
    p.set_defaults(func=merge)

    p = sub.add_parser("generate", help="sample from a checkpoint (default: the built-in tiny Step3p5)")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: built-in tiny Step3p5)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="send the prompts as plain text (default: the tokenizer's "
                                                      "chat template, as training renders them)")
    p.add_argument("--log", default="runs/generate.log", help="where the libraries' output goes (default "
                                                             "runs/generate.log)")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE)
    p.set_defaults(func=generate)

    p = sub.add_parser("plan", help="per-GPU memory plan of a recipe's roles (no model is allocated)")
    p.add_argument("recipe", help="recipe YAML (recipes/step3p5_flash/math_expert.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. resources.actor_gpus=64")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=plan)

    p = sub.add_parser("eval", help="greedy accuracy and pass@k of a checkpoint on the recipe's eval sets")
    p.add_argument("recipe", help="recipe YAML whose data.eval (per domain) is the eval set")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval_size=200")
    p.add_argument("--model", "-m", help="checkpoint folder or hub name (default: the recipe's model.path)")
    p.add_argument("--samples", "-k", type=int, default=4, help="samples per prompt for pass@k (default 4)")
    p.add_argument("--json", help="where to write the results (default: MODEL/eval_<recipe name>.json for a "
                                  "local --model folder, else ./eval_<recipe name>.json; the libraries' output "
                                  "goes beside it, as .log)")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE)
    p.set_defaults(func=evaluate)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`--output DIR trainer.max_steps=5`)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command; its exit code, 2 after a user error, 130 after Ctrl-C."""
    args = parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as exc:  # (evaluated only when an exception gets here)
        from rich.markup import escape

        _stderr().print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    except _guard_errors() as exc:  # a run stopped by a runtime guard: its message, not Ray's traceback
        from rich.markup import escape

        _stderr().print(f"[red]error:[/red] {escape(str(getattr(exc, 'cause', None) or exc))}")
        return 1
