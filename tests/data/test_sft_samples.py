"""SFT samples: single-turn (completion + end of turn) and multi-turn worked episodes replayed through
the environment exactly as a rollout plays them (observations are context, loss mask 0)."""

from pathlib import Path

from mispo.config import load_recipe
from mispo.data import load_rows
from mispo.models.step3p5.tiny import tiny_tokenizer
from mispo.sft import sft_samples

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_single_turn_sample_is_the_completion_and_end_of_turn():
    recipe = load_recipe(RECIPES / "math_expert.yaml")
    tok = tiny_tokenizer()
    rows = load_rows(recipe.warmup.data, recipe.source, "sft", recipe.data, 4)
    for row, s in zip(rows, sft_samples(rows, tok, recipe)):
        assert tok.decode(s.response_ids) == row["completion"] + tok.eos_token
        assert s.loss_mask == [1] * len(s.response_ids)
        assert tok.decode(s.prompt_ids).endswith(row["prompt"] + "<|eot|><|assistant|>")


def test_tool_episode_sample_trains_on_the_model_turns_only():
    recipe = load_recipe(RECIPES / "tool_expert.yaml")
    tok = tiny_tokenizer()
    rows = load_rows(recipe.warmup.data, recipe.source, "sft", recipe.data, 12)
    tagged = {r["completion"].startswith("<answer>") for r in rows}
    assert tagged == {True, False}  # the recipe mixes in episodes that end with a bare number
    eot = tok.eos_token
    for row, s in zip(rows, sft_samples(rows, tok, recipe)):
        assert s.reward == (1.0 if row["completion"].startswith("<answer>") else 0.0)  # scored by the env
        model = "".join(tok.decode([t]) for t, m in zip(s.response_ids, s.loss_mask) if m)
        context = "".join(tok.decode([t]) for t, m in zip(s.response_ids, s.loss_mask) if not m)
        assert model == row["tool_call"] + eot + row["completion"] + eot
        assert context.startswith("<|user|><tool_response") and row["answer"] in context
        assert context.endswith("<|eot|><|assistant|>")
        # the masked span is one contiguous block between the two model turns
        first_zero, last_zero = s.loss_mask.index(0), len(s.loss_mask) - 1 - s.loss_mask[::-1].index(0)
        assert all(m == 0 for m in s.loss_mask[first_zero:last_zero + 1])
