"""What flows through one RL step: `Sample` (one trajectory) and `RolloutBatch` (tensors over a step).

Token ids are kept end to end: the learner trains on exactly the ids the engine sampled, never on
re-tokenised text. Response-aligned tensors are [B, T] with T the longest response of the batch;
`response_mask` is 1 on model-generated tokens (0 on padding and on environment/tool tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class Sample:
    """One trajectory as the rollout engine produced it, plus its reward."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # log pi_rollout of each response token (0.0 on env tokens)
    loss_mask: list[int]  # 1 = model token (trained on), 0 = environment token
    finish_reason: str  # "stop" or "length" (truncated by the length limit)
    group: int = 0  # index of its prompt in the step; samples of one prompt share it
    row: dict = field(default_factory=dict)  # the dataset row (answer, tests, ...)
    prompt_text: str = ""
    response_text: str = ""
    version: int = 0  # optimizer step of the weights that sampled it (partial rollouts: its oldest token's)
    token_versions: list[int] | None = None  # partial rollouts: the version that sampled each response token
    reward: float = 0.0
    reward_info: dict = field(default_factory=dict)
    overlong_penalty: float = 0.0  # reward.overlong's share of `reward` (<= 0; kept on truncated rows under GAE)
    routed_experts: Any = None  # routing replay: the engine's expert ids [seq_len, layers, K] (uint8/16 array)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


TENSOR_FIELDS = ("response_mask", "rollout_logprobs", "truncated", "rewards", "group_ids", "old_logprobs",
                 "ref_logprobs", "version_logprobs", "teacher_logprobs", "values", "bootstrap_values", "advantages", "returns", "token_keep", "traj_keep")


@dataclass
class RolloutBatch:
    """Samples of one step and their response-aligned tensors; learners fill the optional ones."""

    samples: list[Sample]
    response_mask: torch.Tensor  # [B, T] float 0/1
    rollout_logprobs: torch.Tensor  # [B, T]
    truncated: torch.Tensor  # [B] bool
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B] long
    old_logprobs: torch.Tensor | None = None  # [B, T] pi_old (learner, no grad)
    ref_logprobs: torch.Tensor | None = None  # [B, T] frozen reference, for KL
    version_logprobs: torch.Tensor | None = None  # [B, T] pi_v: the learner at the weights that sampled each token
    teacher_logprobs: torch.Tensor | None = None  # [B, T] the domain teacher's (advantage: reverse_kl)
    values: torch.Tensor | None = None  # [B, T] V(s_t) before each response token
    bootstrap_values: torch.Tensor | None = None  # [B] V(s_T) after the last token
    advantages: torch.Tensor | None = None  # [B, T]
    returns: torch.Tensor | None = None  # [B, T] critic targets
    token_keep: torch.Tensor | None = None  # [B, T] MIS-PO masks, computed once per batch
    traj_keep: torch.Tensor | None = None  # [B]

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> "RolloutBatch":
        if not samples:
            raise ValueError("RolloutBatch needs at least one sample")
        length = max(max(len(s.response_ids) for s in samples), 1)
        mask = torch.zeros(len(samples), length)
        logp = torch.zeros(len(samples), length)
        for i, s in enumerate(samples):
            n = len(s.response_ids)
            mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
            logp[i, :n] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        return cls(
            samples=samples, response_mask=mask, rollout_logprobs=logp,
            truncated=torch.tensor([s.truncated for s in samples]),
            rewards=torch.tensor([float(s.reward) for s in samples]),
            group_ids=torch.tensor([s.group for s in samples], dtype=torch.long),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, index: list[int] | torch.Tensor) -> "RolloutBatch":
        """The sub-batch of the given rows (mini-batches), trimmed to its longest response."""
        index = torch.as_tensor(index, dtype=torch.long)
        samples = [self.samples[i] for i in index.tolist()]
        length = max(max(len(s.response_ids) for s in samples), 1)
        out = {}
        for name in TENSOR_FIELDS:
            t = getattr(self, name)
            if t is None:
                out[name] = None
                continue
            t = t[index]
            out[name] = t[:, :length] if t.dim() == 2 else t
        return replace(self, samples=samples, **out)

    def to_dict(self) -> dict:
        """Plain dict (for Ray transport without pickling the class's methods twice)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
