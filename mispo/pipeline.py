"""The expert <-> generalist alternation of the report's post-training, run by `mispo train` when a
recipe has `pipeline:` (and `domains:`):

    DIR/warmup/model/          unified SFT of the base model on every domain's warm-up data
    DIR/round<k>/expert_<d>/   RL of domain d's own recipe, starting from the current generalist
    DIR/round<k>/merge/        mispo merge of the round's experts into the current generalist
    DIR/round<k>/generalist/   RL of this recipe (every domain) from the merged model
    DIR/eval.json              {model: {domain: greedy accuracy}}: base, one entry per expert
                               (named after its domain, last round), generalist
    DIR/eval.png               the same as a grouped bar chart

A stage is finished when its folder holds DONE; rerunning the command skips finished stages and an
interrupted RL stage resumes from its last checkpoint (a merge reuses its sampled data).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from mispo.config import ExpertRef, MergeConfig, Recipe, dump_recipe

console = Console(stderr=True)


class Pipeline:
    def __init__(self, recipe: Recipe, output: str | Path):
        from mispo.loop.domains import check_domain_settings, domain_recipe

        self.recipe, self.cfg = recipe, recipe.pipeline
        self.output = Path(output)
        # every domain recipe is read and validated now, before any stage starts
        self.domain_recipes = {name: domain_recipe(recipe, name, ref) for name, ref in recipe.domains.items()}
        check_domain_settings(_with_overrides(recipe, self.cfg.generalist_overrides), self.domain_recipes)

    def run(self) -> dict:
        from mispo.infra.cluster import start_ray
        from mispo.prepare_model import base_model_path

        start_ray(self.recipe.trainer.ray_address)
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "recipe.yaml").write_text(dump_recipe(self.recipe))
        current = base_model_path(self.recipe).resolve()
        if self.cfg.warmup and self.recipe.warmup is not None and self.recipe.warmup.steps > 0:
            current = self.stage("warmup", lambda folder: self.warm_up(current, folder / "model")) / "model"
        base, experts = current, {}
        for k in range(1, self.cfg.rounds + 1):
            experts = {name: self.stage(f"round{k}/expert_{name}", lambda f, n=name: self.expert(n, current, f))
                       / "final" for name in self.recipe.domains}
            merged = self.stage(f"round{k}/merge", lambda f: self.merge(current, experts, f)) / "model"
            current = merged
            if self.cfg.generalist_steps > 0:
                current = self.stage(f"round{k}/generalist", lambda f: self.generalist(merged, f)) / "final"
        results = self.evaluate({"base": base, **experts, "generalist": current})
        console.print(f"[green]pipeline done: generalist {current}; {self.output}/eval.json[/green]")
        return results

    # ------------------------------------------------------------------ stages
    def stage(self, name: str, work) -> Path:
        """Run `work(folder)` unless `folder/DONE` exists; returns the folder."""
        folder = self.output / name
        if (folder / "DONE").exists():
            console.print(f"[dim]pipeline: {name} already done[/dim]")
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        console.rule(f"pipeline: {name}")
        start = time.time()
        work(folder)
        (folder / "DONE").write_text(json.dumps({"seconds": round(time.time() - start, 1)}) + "\n")
        return folder

    def warm_up(self, base: Path, out: Path) -> None:
        from mispo.loop.metrics_log import MetricsLog
        from mispo.sft import run_warmup

        tmp = out.with_name(out.name + ".tmp")
        log = MetricsLog(out.parent)  # warmup/metrics.jsonl: sft/loss per step (an interrupted warm-up restarts)
        log.truncate(-1)
        try:
            run_warmup(self.recipe, base, tmp, log=log.log)
        finally:
            log.close()
        os.replace(tmp, out)

    def expert(self, name: str, start: Path, folder: Path) -> None:
        """RL on one domain with that domain's recipe (its data, reward, hyperparameters)."""
        child = _with_overrides(self.domain_recipes[name], [f"model.path={start}", "warmup=null",
                                                            *self.cfg.expert_overrides])
        self._train(child, folder)

    def merge(self, student: Path, experts: dict[str, Path], folder: Path) -> None:
        from mispo.distill.merge import Merge

        refs = {name: ExpertRef(**ref.model_dump(), checkpoint=str(experts[name]))
                for name, ref in self.recipe.domains.items()}
        merge_cfg = (self.recipe.merge or MergeConfig()).model_copy(update={"experts": refs})
        merge = Merge(self.recipe.model_copy(update={"merge": merge_cfg}), folder, student=student, experts=experts)
        try:
            merge.run()
        finally:
            merge.close()

    def generalist(self, start: Path, folder: Path) -> None:
        """RL of this recipe on every domain at once, from the merged model."""
        child = _with_overrides(self.recipe, [f"model.path={start}", "warmup=null", "pipeline=null", "merge=null",
                                              f"trainer.max_steps={self.cfg.generalist_steps}",
                                              *self.cfg.generalist_overrides])
        self._train(child, folder)

    def _train(self, recipe: Recipe, folder: Path) -> None:
        from mispo.loop.trainer import Trainer

        trainer = Trainer(recipe, folder)
        try:
            trainer.fit()
        finally:
            trainer.shutdown()

    # ------------------------------------------------------------------ the report
    def evaluate(self, models: dict[str, Path]) -> dict:
        """Every model on every domain -> DIR/eval.json and DIR/eval.png."""
        from mispo.loop.domains import Domain
        from mispo.evaluate import Evaluator
        from mispo.plot import plot_eval

        domains = [Domain(name, self.domain_recipes[name]).load(with_train=False) for name in self.recipe.domains]
        evaluator = Evaluator(models["base"], domains, self.recipe)
        try:
            results = {name: evaluator.accuracy(path) for name, path in models.items()}
        finally:
            evaluator.close()
            for d in domains:
                d.close()
        (self.output / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_eval(results, self.output / "eval.png", title=f"{self.recipe.name}: greedy accuracy per domain",
                  labels={d: f"{d} expert" for d in self.recipe.domains})
        return results


def _with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`recipe` with dotted overrides applied and validated again."""
    from mispo.config import apply_override, parse_override

    data = recipe.model_dump(mode="json", exclude_unset=True)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    out = Recipe.model_validate(data)
    out.source = recipe.source
    return out
