"""`mispo merge`: distil domain experts back into one student (the recipe's `merge:` section).

Method `sft` (the report's self-distillation):
  1. check    every expert shares the student's architecture and tokenizer; every domain has prompts
  2. sample   each expert answers `prompts_per_domain` of its domain's prompts `samples_per_prompt`
              times (on one vLLM engine that loads each expert's weights in turn)
  3. filter   rejection sampling (mispo.distill.filters): reward, truncation, script, length,
              repetition, duplicates; a filter that leaves a domain empty is an error naming it
  4. balance  each domain's share of the SFT set is its expert's weight (`balance: weights`)
  5. SFT      the student on the kept answers, loss on the model's own tokens only
Method `on_policy` replaces 2-5 with the student sampling and each token pushed toward its domain
expert by a per-token reverse KL (mispo.distill.on_policy).
Finally every model (student before and after, each expert) is evaluated greedily on every domain.

    DIR/model/                 the merged student (release format)
    DIR/data/<domain>.jsonl    the kept answers (token ids, loss mask, text, reward)
    DIR/filter_counts.json     {domain: {sampled, kept, kept_frac, rejected: {filter: count}}}
    DIR/eval.json              {"student": {domain: acc}, "<domain>": {...} (its expert), "merged": {...}}

Rerunning into the same DIR reuses each domain's sampled data and a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from rich.console import Console

from mispo.batch import Sample
from mispo.weights.checkpoint_io import check_interchangeable
from mispo.config import Recipe, RecipeError, resolve_path
from mispo.distill.filters import Candidate, apply_filters, check_kept
from mispo.loop.domains import Domain, domain_recipe
from mispo.prepare_model import base_model_path

console = Console(stderr=True)


class Merge:
    """One `mispo merge` run; `run()` does every stage (see the module docstring)."""

    def __init__(self, recipe: Recipe, output: str | Path, student: str | Path | None = None,
                 experts: dict[str, str | Path] | None = None):
        if recipe.merge is None or not recipe.merge.experts:
            raise RecipeError(f"{recipe.source or 'recipe'}: merge.experts is empty; fix: add merge: {{experts: "
                              "{math: {checkpoint: runs/math/final, recipe: math_expert.yaml}}}")
        self.recipe, self.cfg = recipe, recipe.merge
        self.output = Path(output)
        self.student = Path(student) if student else base_model_path(recipe)
        self.experts = {name: Path(experts[name]) if experts else resolve_path(recipe, ref.checkpoint)
                        for name, ref in self.cfg.experts.items()}
        self.filters = self.cfg.filters
        # 1. checks, before any engine starts
        check_interchangeable(self.student, self.experts, field="merge.experts", source=recipe.source)
        self.domains = [Domain(name, domain_recipe(recipe, name, ref), ref.weight).load()
                        for name, ref in self.cfg.experts.items()]
        for d in self.domains:
            if not d.train_rows:
                raise RecipeError(f"merge.experts.{d.name}: the domain has no prompts ({d.recipe.source}, data.train)")
            if self.cfg.eval and not d.eval_rows:
                raise RecipeError(f"merge.experts.{d.name}: the domain has no eval rows ({d.recipe.source}, "
                                  "data.eval); fix: set data.eval there, or merge.eval: false")
        self.evaluator = None

    # ------------------------------------------------------------------ stages
    def run(self) -> dict:
        from mispo.infra.cluster import start_ray
        from mispo.evaluate import Evaluator

        start_ray(self.recipe.trainer.ray_address)
        self.output.mkdir(parents=True, exist_ok=True)
        evaluate = self.cfg.eval
        if evaluate or self.cfg.method == "sft":  # on_policy distillation samples on the trainer's own engines
            self.evaluator = Evaluator(self.student, self.domains, self.recipe)
            self.rollout, self.tokenizer = self.evaluator.rollout, self.evaluator.tokenizer
        results = {"student": self.evaluator.accuracy(self.student)} if evaluate else {}
        kept = {}
        for d in self.domains:  # each expert samples, then is evaluated while its weights are loaded
            if self.cfg.method == "sft":
                kept[d.name] = self.sample_and_filter(d)
            if evaluate:
                results[d.name] = self.evaluator.accuracy(self.experts[d.name])
        model_dir = self.output / "model"
        if (model_dir / "config.json").exists():
            console.print(f"[dim]merge: {model_dir} already done[/dim]")
        elif self.cfg.method == "sft":
            weights = {d.name: d.weight for d in self.domains}
            self.fine_tune(balance(kept, weights, self.cfg.balance, seed=self.recipe.trainer.seed), model_dir)
        else:
            from mispo.distill.on_policy import distill_on_policy

            distill_on_policy(self, model_dir)
        if evaluate:
            results["merged"] = self.evaluator.accuracy(model_dir)
            _write_json(self.output / "eval.json", results)
        return results

    def sample_and_filter(self, domain: Domain) -> list[Sample]:
        """The expert's kept answers on its domain (cached in DIR/data/<domain>.jsonl)."""
        cfg, data = self.cfg, self.output / "data"
        key = _key(str(self.experts[domain.name].resolve()), cfg.prompts_per_domain, cfg.samples_per_prompt,
                   cfg.temperature, cfg.filters.model_dump(), domain.recipe.model_dump(mode="json"))
        file, counts_file = data / f"{domain.name}.jsonl", self.output / "filter_counts.json"
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
        if file.exists() and counts.get(domain.name, {}).get("key") == key:
            return [_sample_from_json(line) for line in file.read_text().splitlines() if line.strip()]
        self.evaluator.load(self.experts[domain.name])
        requests = domain.draw_requests(domain.sampler(), cfg.prompts_per_domain, self.tokenizer)
        samples = domain.sample(self.rollout, requests, cfg.samples_per_prompt, cfg.temperature,
                                  seed=self.recipe.trainer.seed)
        domain.score(samples)
        kept_idx, report = apply_filters([_candidate(s) for s in samples], self.filters)
        counts[domain.name] = {**report.to_dict(), "key": key}
        _write_json(counts_file, counts)
        console.print(f"merge: {domain.name}: {report.summary()}")
        check_kept(f"merge.experts.{domain.name}", report, self.filters)
        kept = [samples[i] for i in kept_idx]
        data.mkdir(exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(_sample_to_json(s, domain.name)) + "\n" for s in kept))
        os.replace(tmp, file)
        return kept

    def fine_tune(self, samples: list[Sample], model_dir: Path) -> None:
        from mispo.sft import run_sft

        tmp = model_dir.with_name(model_dir.name + ".tmp")
        run_sft(self.student, samples, self.cfg.sft, self.recipe, tmp, description="merge SFT")
        os.replace(tmp, model_dir)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        for d in self.domains:
            d.close()


# ---------------------------------------------------------------------------- helpers
def balance(kept: dict[str, list], weights: dict[str, float], mode: str = "weights", seed: int = 0) -> list:
    """The SFT set from each domain's kept answers. `weights`: with N kept answers in all, domain d
    gets round(N * w_d / sum w) of them, drawn without replacement while it has enough and repeated
    after that; `natural`: every kept answer once."""
    if mode == "natural":
        return [s for samples in kept.values() for s in samples]
    total, norm = sum(len(v) for v in kept.values()), sum(weights[name] for name in kept)
    rng = random.Random(f"mispo.merge.balance:{seed}")
    out = []
    for name, samples in kept.items():
        want = round(total * weights[name] / norm)
        picks = rng.sample(samples, min(want, len(samples)))
        picks += [rng.choice(samples) for _ in range(want - len(picks))]
        console.print(f"merge: {name}: {len(samples)} kept answers -> {want} SFT examples")
        out += picks
    return out


def _candidate(s: Sample) -> Candidate:
    """The filters' view of a sample: its model tokens, and the user's own prompt text (the chat
    template's markers would make their script look allowed everywhere)."""
    prompt = s.row.get("prompt", s.prompt_text)
    if isinstance(prompt, list):
        prompt = "\n".join(str(m.get("content", "")) for m in prompt)
    own = [t for t, m in zip(s.response_ids, s.loss_mask) if m]
    return Candidate(prompt_key=str(s.group), prompt_text=str(prompt), response_text=s.response_text,
                     response_tokens=own, reward=s.reward, finish_reason=s.finish_reason)


def _sample_to_json(s: Sample, domain: str) -> dict:
    return {"domain": domain, "prompt_text": s.prompt_text, "response_text": s.response_text, "reward": s.reward,
            "prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "loss_mask": s.loss_mask,
            "finish_reason": s.finish_reason, "row": s.row}


def _sample_from_json(line: str) -> Sample:
    d = json.loads(line)
    return Sample(prompt_ids=d["prompt_ids"], response_ids=d["response_ids"],
                  rollout_logprobs=[0.0] * len(d["response_ids"]), loss_mask=d["loss_mask"],
                  finish_reason=d["finish_reason"], row=d["row"], prompt_text=d["prompt_text"],
                  response_text=d["response_text"], reward=d["reward"])


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
