"""Supervised warm-up before RL: fine-tune the starting model on the task's worked examples
(prompt -> completion + end-of-turn) with the same DeepSpeed learner, and export the result.
Used by recipes whose model starts random (the tiny CPU recipes); cached by `prepare_model`.
"""

from __future__ import annotations

from pathlib import Path

import ray
from rich.progress import Progress

from mispo.batch import Sample
from mispo.config import OptimConfig, Recipe
from mispo.data import load_rows, render_prompt


def sft_samples(rows: list[dict], tokenizer, recipe: Recipe) -> list[Sample]:
    """Prompt ids from the chat template; response = completion followed by the end-of-turn token.

    With a multi-turn environment the prompt is the environment's first observation (as the rollout
    workers render it) and the target is the first turn of the worked solution (`tool_call` when
    the row has one)."""
    env = None
    if recipe.rollout.environment:
        from mispo.plugins import ENVIRONMENT_GROUP, load_object
        from mispo.rollout.vllm_engine import _env_factory
        env = _env_factory(load_object(recipe.rollout.environment, field="rollout.environment",
                                       group=ENVIRONMENT_GROUP, source=recipe.source))()
    out = []
    for row in rows:
        target = row["completion"]
        if env is not None:
            row, target = {**row, "prompt": env.reset(row)}, row.get("tool_call", target)
        _, prompt_ids = render_prompt(row, tokenizer, recipe.data)
        response = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append(Sample(prompt_ids=prompt_ids, response_ids=response, rollout_logprobs=[0.0] * len(response),
                          loss_mask=[1] * len(response), finish_reason="stop", row=row))
    return out


def run_warmup(recipe: Recipe, base: Path, out: Path, master_port: int) -> Path:
    """`warmup.steps` SFT steps of `warmup.batch_size` examples from `warmup.data`; writes `out`."""
    from transformers import AutoTokenizer

    from mispo.learner.policy_worker import PolicyWorker

    w = recipe.warmup
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = load_rows(w.data, recipe.source, "sft", recipe.data, w.num_examples)
    samples = sft_samples(rows, tokenizer, recipe)
    learner = recipe.learner.model_copy(update={"actor": OptimConfig(lr=w.lr, warmup_steps=min(30, w.steps // 10),
                                                                      weight_decay=0.0, grad_clip=1.0)})
    model = recipe.model.model_copy(update={"freeze_router": False})
    worker = ray.remote(num_cpus=0)(PolicyWorker).remote(
        str(base), model=model.model_dump(), learner=learner.model_dump(), algorithm=recipe.algorithm.model_dump(),
        max_new_tokens=recipe.rollout.max_new_tokens, master_port=master_port, seed=recipe.trainer.seed)
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("warm-up SFT", total=w.steps)
            for step in range(w.steps):
                start = (step * w.batch_size) % max(len(samples) - w.batch_size, 1)
                metrics = ray.get(worker.sft_step.remote(samples[start:start + w.batch_size]))
                bar.update(task, advance=1, description=f"warm-up SFT loss {metrics['sft/loss']:.3f}")
        ray.get(worker.export.remote(str(out)))
        tokenizer.save_pretrained(out)
    finally:
        ray.kill(worker)
    return out
