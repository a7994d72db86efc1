"""Greedy per-domain accuracy of several checkpoints of one architecture, on one vLLM engine: the
engine starts with the first checkpoint and each next one is swapped in by a weight sync; and pass@k
from n samples per prompt (`mispo eval`).

    ev = Evaluator(first_checkpoint, domains, recipe)
    ev.accuracy("runs/math/final")      # {"math": 0.62, "tool": 0.31}
    ev.sampled("runs/math/final", n=8, temperature=1.0)   # {"math": {"pass@1": ..., "pass@8": ..., ...}}
    ev.close()

A sample is correct when its reward (Domain.score: the reward plugins, then reward.overlong if set) is
at least CORRECT; the built-in verifiers give 1.0 to a right answer. Greedy accuracy is the mean reward
of one greedy answer per prompt (Domain.evaluate).
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console

from mispo.weights.checkpoint_io import read_buckets
from mispo.config import Recipe
from mispo.loop.domains import Domain

console = Console(stderr=True)
CORRECT = 1.0  # a sample whose reward reaches this is correct (pass@k)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... below n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return ks + [n]


class Evaluator:
    """Owns a RolloutGroup (`self.rollout`, usable for sampling too) and knows which weights it serves."""

    def __init__(self, first_checkpoint: str | Path, domains: list[Domain], recipe: Recipe):
        from transformers import AutoTokenizer

        from mispo.rollout.group import RolloutGroup

        self.domains = domains
        self.tokenizer = AutoTokenizer.from_pretrained(first_checkpoint)
        self.rollout = RolloutGroup(str(first_checkpoint), recipe.rollout,
                                    dtype=recipe.rollout.dtype or recipe.model.dtype, seed=recipe.trainer.seed,
                                    tensor_parallel=recipe.resources.rollout_tensor_parallel,
                                    expert_parallel=recipe.resources.rollout_expert_parallel)
        self.loaded: Path | None = Path(first_checkpoint)

    def load(self, checkpoint: str | Path) -> None:
        """Serve `checkpoint` (no-op when it is already served)."""
        checkpoint = Path(checkpoint)
        if self.loaded != checkpoint:
            self.rollout.sync(read_buckets(checkpoint), version=0)
            self.loaded = checkpoint

    def accuracy(self, checkpoint: str | Path) -> dict[str, float]:
        """{domain: greedy accuracy on its eval rows} of `checkpoint`."""
        return {name: acc for name, (acc, _) in self.greedy(checkpoint).items()}

    def greedy(self, checkpoint: str | Path) -> dict[str, tuple[float, list[dict]]]:
        """{domain: (greedy accuracy, the greedy answer of each eval row)} of `checkpoint`."""
        self.load(checkpoint)
        out = {d.name: d.greedy_answers(self.rollout, self.tokenizer) for d in self.domains}
        console.print(f"[dim]eval {checkpoint}: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in out.items()) + "[/dim]")
        return out

    def sampled(self, checkpoint: str | Path, n: int, temperature: float, top_p: float = 1.0,
                seed: int | None = None) -> dict[str, dict]:
        """{domain: {"pass@k": mean over eval rows of pass_at_k(n, c_row, k) for k in k_values(n),
        "correct": [c_row, ...]}} from n samples per eval row of `checkpoint`."""
        self.load(checkpoint)
        out = {}
        for d in self.domains:
            if not d.eval_rows:
                raise ValueError(f"domain {d.name!r} has no eval rows; fix: set data.eval in {d.recipe.source}")
            samples = d.sample(self.rollout, d.requests(d.eval_rows, self.tokenizer), n=n,
                                 temperature=temperature, top_p=top_p, seed=seed)
            d.score(samples)
            correct = [0] * len(d.eval_rows)
            for s in samples:  # requests' groups are 0 .. rows - 1
                correct[s.group] += s.reward >= CORRECT
            out[d.name] = {**{f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct)
                              for k in k_values(n)}, "correct": correct}
        return out

    def close(self) -> None:
        self.rollout.shutdown()


def evaluate_model(recipe: Recipe, model: str | Path, samples: int) -> dict:
    """`mispo eval`'s report of `model` on the recipe's eval rows, on one engine: per domain the greedy
    accuracy, and pass@k (k in k_values(samples)) from `samples` samples per row at rollout.temperature /
    top_p, seeded by trainer.seed; "correct" lists each row's number of correct samples."""
    from mispo.infra.cluster import start_ray
    from mispo.loop.domains import load_domains

    domains = load_domains(recipe, with_train=False)
    evaluator = None
    try:
        start_ray(recipe.trainer.ray_address)
        evaluator = Evaluator(model, domains, recipe)
        greedy = evaluator.greedy(model)
        sampled = evaluator.sampled(model, samples, recipe.rollout.temperature, recipe.rollout.top_p,
                                    seed=recipe.trainer.seed)
    finally:
        if evaluator is not None:
            evaluator.close()
        for d in domains:
            d.close()
    per_domain = {d.name: {"eval_rows": len(d.eval_rows), "greedy_accuracy": greedy[d.name][0], **sampled[d.name],
                           "greedy_answers": greedy[d.name][1]} for d in domains}
    return {"model": str(model), "recipe": recipe.source, "samples": samples,
            "temperature": recipe.rollout.temperature, "top_p": recipe.rollout.top_p, "seed": recipe.trainer.seed,
            "domains": per_domain}
