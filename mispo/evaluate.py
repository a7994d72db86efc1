"""Greedy per-domain accuracy of several checkpoints of one architecture, on one vLLM engine: the
engine starts with the first checkpoint and each next one is swapped in by a weight sync.

    ev = Evaluator(first_checkpoint, domains, recipe)
    ev.accuracy("runs/math/final")      # {"math": 0.62, "tool": 0.31}
    ev.close()
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mispo.checkpoint_io import read_buckets
from mispo.config import Recipe
from mispo.domains import Domain

console = Console(stderr=True)


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
        self.load(checkpoint)
        scores = {d.name: d.evaluate(self.rollout, self.tokenizer) for d in self.domains}
        console.print(f"[dim]eval {checkpoint}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + "[/dim]")
        return scores

    def close(self) -> None:
        self.rollout.shutdown()
