"""The critic learner: a DeepSpeed engine over a value model (backbone + scalar head).

    values, bootstrap = worker.compute_values(batch)   # V(s_t) per response token, V(s_T) per row
    metrics = worker.train(batch)                      # masked MSE to batch.returns

Data-parallel ranks share the batch as the policy learner's do (see `mispo.learner.policy_worker`).
"""

from __future__ import annotations

import time

import torch

from mispo.algorithms import value_loss
from mispo.batch import RolloutBatch
from mispo.learner.metrics import combine_partials, mean_metrics, mini_batches, peak_rss_gib
from mispo.learner.models import ValueModel
from mispo.learner.packing import gather_response, last_positions
from mispo.learner.worker_base import LearnerWorker


class CriticWorker(LearnerWorker):
    """Owns the value model's DeepSpeed engine; set-up, `micro_batches`, `save` and `load` are
    `LearnerWorker`'s."""

    def __init__(self, model_path: str, model: dict, learner: dict, algorithm: dict, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29600, seed: int = 0,
                 cpu_cores: list[int] | None = None, concurrent_roles: int = 1, offload_optimizer: bool = False):
        super().__init__(model, learner, algorithm, rank, world_size, master_addr, master_port, seed, cpu_cores,
                         concurrent_roles, offload_optimizer)
        module = ValueModel.load(model_path, self.model_cfg.dtype, self.model_cfg.gradient_checkpointing)
        self.build(module, self.learner_cfg.critic, generator_seed=seed + 1)

    def _values(self, mb):
        return self.engine(mb.input_ids.to(self.device), mb.position_ids.to(self.device))  # [1, L]

    @torch.no_grad()
    def compute_values(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """{"values": [B, T] V(s_t) before each response token, "bootstrap_values": [B] V(s_T)}; rows
        outside this rank's share are 0."""
        self.engine.eval()
        length = batch.response_mask.shape[1]
        values, boot = torch.zeros(len(batch), length), torch.zeros(len(batch))
        for mb in self.micro_batches(batch.samples):
            v = self._values(mb)
            if mb.padding:
                continue
            values[mb.rows] = gather_response(v, mb, length).cpu()
            boot[mb.rows] = v[0, last_positions(mb).to(v.device)].cpu()
        return {"values": values, "bootstrap_values": boot}

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """`critic_mini_batches` optimizer steps of masked MSE (optionally clipped, optionally masked by
        the MIS-PO filters) towards batch.returns."""
        self.engine.train()
        start = time.time()
        parts = []
        for rows in mini_batches(len(batch), self.learner_cfg.critic_mini_batches, self.generator):
            mini = batch.select(rows)
            num_tokens = float(mini.response_mask.sum())
            micro, pieces = self.micro_batches(mini.samples), []
            for i, mb in enumerate(micro):
                sub = mini.select(mb.rows)
                length = sub.response_mask.shape[1]
                pred = gather_response(self._values(mb), mb, length)
                keep = None
                if self.algo.critic_masks and sub.token_keep is not None:
                    keep = (sub.token_keep & sub.traj_keep[:, None]).to(self.device)
                loss, metrics = value_loss(
                    pred, sub.returns.to(self.device), sub.response_mask.to(self.device),
                    old_values=sub.values.to(self.device) if self.algo.value_clip else None,
                    clip_range=self.algo.value_clip, keep_mask=keep, num_tokens=num_tokens,
                    num_seqs=float(len(mini)))
                self.backward(loss, mb, last=i == len(micro) - 1)
                if not mb.padding:
                    pieces.append({k: float(v) for k, v in metrics.items()})
            if pieces:
                parts.append(combine_partials(pieces))
            self.engine.step()
        out = mean_metrics(parts)
        out["critic/lr"] = self.engine.get_lr()[0]
        out["time/critic_train_s"] = time.time() - start
        out["mem/critic_peak_rss_gib_max"] = peak_rss_gib()  # the largest rank's
        return out
