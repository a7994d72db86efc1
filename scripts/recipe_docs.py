"""Write docs/recipes.md from the recipe schema (mispo/config.py): `python scripts/recipe_docs.py`.
tests/trainer/test_recipe.py checks that the file is current."""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mispo.config import Recipe  # noqa: E402

HEADER = """# Recipe reference

A recipe is YAML with the sections below; every key is optional (the defaults are shown).
Override any key on the command line: `mispo train RECIPE section.key=value`.
Unknown keys are errors. Generated from `mispo/config.py` by `scripts/recipe_docs.py`.
"""

FOOTER = """## Logged learner metrics

What the learners log each step (metrics.jsonl), for the options above:

| metric | what it measures |
| --- | --- |
| `mismatch/log_ratio_abs_mean`, `_max` | the train/inference gap: mean and max over response tokens of /log pi_old - log pi_rollout/ (pi_old: the learner at the rollout's weights, pi_rollout: the engine's log-probs); logged by every loss that has the engine's log-probs, under this one name |
| `mispo/token_keep_frac`, `mispo/keep_frac` | share of response tokens inside `algorithm.token_bounds` (and, for keep_frac, in a kept trajectory) |
| `mispo/traj_keep_frac`, `mispo/log_rho_abs_mean` | share of trajectories inside `algorithm.traj_bounds`; mean /log rho/ over trajectories |
| `actor/entropy`, `actor/kl`, `adv/mean`, `adv/std` | per-token means (std pooled) over the response tokens |
| `actor/num_tokens`, `actor/num_rows`, `critic/num_tokens` | response tokens and rows trained on: the weights of the means above |

Each value is the whole batch's, whatever the split into micro-batches, mini-batches and ranks: means are
weighted by the pieces' token (or row) counts, `_max` keys take the largest, the losses (divided by the whole
mini-batch's token count) add up (`mispo/learner/metrics.py`).
"""


def _section_type(annotation) -> type[BaseModel] | None:
    """The model class of a field typed `Section`, `Section | None` or `dict[str, Section]`."""
    for arg in (annotation, *typing.get_args(annotation)):
        if inspect.isclass(arg) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is dict and inspect.isclass(typing.get_args(arg)[1]):
            inner = typing.get_args(arg)[1]
            if issubclass(inner, BaseModel):
                return inner
    return None


def _default(field, value=None) -> str:
    if field.is_required():
        return "required"
    if value is None:
        value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{value!r}`"


def section(name: str, model: type[BaseModel], out: list[str], instance: BaseModel | None = None) -> None:
    """A table of `model`'s keys; defaults from `instance` when the parent field's default differs."""
    doc = inspect.getdoc(model) if model.__doc__ else ""
    out += [f"## `{name}`", ""] + ([doc, ""] if doc else [])
    nested = []
    out += ["| key | default | notes |", "| --- | --- | --- |"]
    for key, field in model.model_fields.items():
        if field.exclude:
            continue
        sub = _section_type(field.annotation)
        keyed = typing.get_origin(field.annotation) is dict or any(
            typing.get_origin(a) is dict for a in typing.get_args(field.annotation))
        value = getattr(instance, key) if instance is not None else None
        if sub is not None:
            child = value if isinstance(value, BaseModel) else field.get_default(call_default_factory=True)
            nested.append((f"{name}.{key}" + (".<name>" if keyed else ""), sub,
                           child if isinstance(child, BaseModel) else None))
        default = "see below" if sub is not None and not keyed else _default(field, value)
        out.append(f"| `{key}` | {default} | {(field.description or '').replace('|', '/')} |")
    out.append("")
    for child_name, child, child_instance in nested:
        section(child_name, child, out, child_instance)


def render() -> str:
    out = [HEADER]
    for key, field in Recipe.model_fields.items():
        if field.exclude:
            continue
        model = _section_type(field.annotation)
        if model is None:
            out += [f"## `{key}`", "", f"default: {_default(field)}", ""]
        else:
            section(key + (".<name>" if typing.get_origin(field.annotation) is dict else ""), model, out)
    return "\n".join(out).rstrip() + "\n\n" + FOOTER


if __name__ == "__main__":
    (ROOT / "docs" / "recipes.md").write_text(render())
    print("wrote docs/recipes.md")
