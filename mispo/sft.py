"""Supervised fine-tuning with the DeepSpeed policy learner: the cached warm-up before RL, `mispo sft`,
and the student's update in `mispo merge`.

    samples = sft_samples(rows, tokenizer, recipe)   # prompt ids + completion ids + EOS; loss on the completion
    run_sft(model_path, samples, recipe.sft, recipe, output_dir)   # writes output_dir in release format

The loss is the token-mean cross-entropy of the tokens whose `loss_mask` is 1 (the completion; in a
multi-turn sample only the model's own turns). Each pass over the samples is a fresh seeded
shuffle; one optimizer step takes `batch_size` samples.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import ray
from rich.progress import Progress

from mispo.batch import Sample
from mispo.config import OptimConfig, Recipe, RecipeError, WarmupConfig
from mispo.data import load_rows, render_prompt


def sft_samples(rows: list[dict], tokenizer, recipe: Recipe) -> list[Sample]:
    """Prompt ids from the chat template; response = completion followed by the end-of-turn token.

    With a multi-turn environment the worked solution is replayed through the environment exactly
    as a rollout would play it (`mispo.rollout.episode_loop.run_episode`): the prompt is `env.reset(row)`,
    the model turns are `tool_call` (when the row has one) then `completion`, each ending with the
    end-of-turn token, and the environment's observations in between are context (loss mask 0)."""
    if not recipe.rollout.environment:
        out = []
        for row in rows:
            _, prompt_ids = render_prompt(row, tokenizer, recipe.data)
            response = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            out.append(Sample(prompt_ids=prompt_ids, response_ids=response, rollout_logprobs=[0.0] * len(response),
                              loss_mask=[1] * len(response), finish_reason="stop", row=row))
        return out
    from mispo.rollout.episode_loop import run_episode
    from mispo.scoring.plugins import ENVIRONMENT_GROUP, load_object
    from mispo.rollout.episodes import chat_encoder, env_factory, observation_wrapper

    make_env = env_factory(load_object(recipe.rollout.environment, field="rollout.environment",
                                       group=ENVIRONMENT_GROUP, source=recipe.source))
    default_wrap = observation_wrapper(tokenizer)
    out = []
    for row in rows:
        env = make_env()
        turns = [t for t in (row.get("tool_call"), row["completion"]) if t]

        def scripted(ids, budget, turns=turns):
            text = turns.pop(0)
            return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id], text, "stop"

        ep = run_episode(env, row, scripted, chat_encoder(tokenizer), max_turns=len(turns), max_tokens=1 << 30,
                         wrap_observation=getattr(env, "wrap_observation", default_wrap))
        response = ep.token_ids[ep.prompt_len:]
        out.append(Sample(prompt_ids=ep.token_ids[:ep.prompt_len], response_ids=response,
                          rollout_logprobs=[0.0] * len(response), loss_mask=ep.loss_mask[ep.prompt_len:],
                          finish_reason="stop", row=row, reward=ep.reward))
    return out


def recipe_sft_samples(recipe: Recipe, cfg: WarmupConfig, tokenizer) -> list[Sample]:
    """The SFT set of a recipe: `cfg.data` rendered for the recipe, or, for a multi-domain recipe, the
    union of every domain recipe's own warm-up data (its `warmup.data` / `num_examples`)."""
    if not recipe.domains:
        rows = load_rows(cfg.data, recipe.source, "sft", recipe.data, cfg.num_examples)
        return sft_samples(rows, tokenizer, recipe)
    from mispo.loop.domains import domain_recipe

    samples = []
    for name, ref in recipe.domains.items():
        child = domain_recipe(recipe, name, ref)
        if child.warmup is None:
            raise RecipeError(f"domain {name!r} ({child.source}) has no warmup: section, so the unified SFT has "
                             "no data for it; fix: give that recipe warmup: {data: ..., num_examples: ...}")
        rows = load_rows(child.warmup.data, child.source, "sft", child.data, child.warmup.num_examples)
        samples += sft_samples(rows, tokenizer, child)
    return samples


def run_sft(model_path: str | Path, samples: list[Sample], cfg: WarmupConfig, recipe: Recipe, output: str | Path,
            log: Callable[[int, dict], None] | None = None, description: str = "SFT") -> Path:
    """`cfg.steps` optimizer steps of `cfg.batch_size` samples (lr `cfg.lr`, linear warm-up over the
    first tenth, at most 30 steps) on the policy learner's ranks (`learner.ranks` on a CPU run); exports
    the result with its tokenizer to `output`."""
    from transformers import AutoTokenizer

    from mispo.infra.cluster import standalone_learner_options
    from mispo.learner.group import LearnerGroup
    from mispo.learner.policy_worker import PolicyWorker

    if not samples:
        raise ValueError(f"{description}: no training samples")
    learner = recipe.learner.model_copy(update={"actor": OptimConfig(
        lr=cfg.lr, warmup_steps=min(30, cfg.steps // 10), weight_decay=0.0, grad_clip=1.0)})
    model = recipe.model.model_copy(update={"freeze_router": False, "lora": None})  # full fine-tuning
    group = LearnerGroup(PolicyWorker, standalone_learner_options(), str(model_path), cpu_ranks=learner.ranks,
                         model=model.model_dump(), learner=learner.model_dump(),
                         algorithm=recipe.algorithm.model_dump(), max_new_tokens=recipe.rollout.max_new_tokens,
                         seed=recipe.trainer.seed, offload_optimizer=recipe.resources.offload_optimizer)
    rng = random.Random(f"mispo.sft:{recipe.trainer.seed}")
    order: list[int] = []
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task(description, total=cfg.steps)
            for step in range(cfg.steps):
                if len(order) < cfg.batch_size:  # a fresh shuffled pass, topping up the remainder
                    fresh = list(range(len(samples)))
                    rng.shuffle(fresh)
                    order += fresh
                batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
                parts = group.all(PolicyWorker.sft_step, ray.put([samples[i] for i in batch]))  # each rank its share
                metrics = {"sft/loss": sum(m["sft/loss"] for m in parts), "sft/lr": parts[0]["sft/lr"]}
                if log is not None:
                    log(step + 1, metrics)
                bar.update(task, advance=1, description=f"{description} loss {metrics['sft/loss']:.3f}")
        group.all(PolicyWorker.export, str(output))
        AutoTokenizer.from_pretrained(model_path).save_pretrained(output)
    finally:
        group.kill()
    return Path(output)


def run_warmup(recipe: Recipe, base: Path, out: Path, log: Callable[[int, dict], None] | None = None) -> Path:
    """The recipe's warm-up (`warmup:`) from `base` into `out`."""
    from transformers import AutoTokenizer

    samples = recipe_sft_samples(recipe, recipe.warmup, AutoTokenizer.from_pretrained(base))
    return run_sft(base, samples, recipe.warmup, recipe, out, log=log, description="warm-up SFT")
