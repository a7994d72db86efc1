"""A frozen model that scores other models' samples (run as a Ray actor): the domain expert of
on-policy distillation, whose per-token log-probs on the student's own samples give the reverse KL.

    logp_teacher = worker.compute_logprobs(batch)   # [B, T], no grad
"""

from __future__ import annotations

import torch

from mispo.batch import RolloutBatch
from mispo.learner.models import load_policy
from mispo.learner.packing import response_logprobs


class TeacherWorker:
    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_tokens: int = 4096,
                 num_threads: int = 0, temperature: float = 1.0):
        """`temperature`: log-probs are of softmax(logits / T), the student's sampling distribution's form."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_policy(model_path, dtype).to(self.device).eval().requires_grad_(False)
        self.micro_batch_tokens = micro_batch_tokens
        self.temperature = temperature

    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T] log p_teacher of each response token (zeros past each response), fp32 on CPU."""
        return response_logprobs(self.model, batch.samples, self.micro_batch_tokens, self.device,
                                 temperature=self.temperature)
