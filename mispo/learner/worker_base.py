"""What the DeepSpeed learners (policy and critic) share: set-up, this rank's share of a batch, one
micro-batch's backward, and DeepSpeed checkpoints.

    class CriticWorker(LearnerWorker):
        def __init__(self, model_path, model, learner, algorithm, rank=0, world_size=1, ...):
            super().__init__(model, learner, algorithm, rank, world_size, master_addr, master_port, seed)
            self.build(ValueModel.load(model_path, ...), self.learner_cfg.critic, generator_seed=seed + 1)

Set-up order (part of the contract, for reproducibility): configs, the CPU cores and torch threads
(`infra/cpu_split.pin_process`: the cores shared by the learner processes that compute at once), the process group,
`torch.manual_seed(seed)`, then the subclass loads its module and calls `build`.
"""

from __future__ import annotations

import torch

from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
from mispo.infra.cpu_split import pin_process
from mispo.learner.data_parallel import rank_share
from mispo.learner.engine import accumulate, build_engine, init_distributed
from mispo.learner.packing import PackedMicroBatch


class LearnerWorker:
    """One data-parallel rank of a learner role: `engine` (DeepSpeed), `generator` (mini-batch order),
    `device`, `rank` / `world_size`, and the recipe sections `model_cfg`, `learner_cfg`, `algo`."""

    def __init__(self, model: dict, learner: dict, algorithm: dict, rank: int, world_size: int,
                 master_addr: str, master_port: int, seed: int, cpu_cores: list[int] | None = None,
                 concurrent_roles: int = 1, offload_optimizer: bool = False):
        """`cpu_cores`: the cores of a CPU run's learners (None: every core the process may use); they are shared
        by this role's `world_size` ranks and, with `concurrent_roles` 2, by the other learner role's ranks that
        compute at the same time (policy and critic), so torch threads = cores / (world_size x concurrent_roles).
        `offload_optimizer`: resources.offload_optimizer (ZeRO-Offload, `engine.build_engine`)."""
        self.model_cfg, self.learner_cfg = ModelConfig(**model), LearnerConfig(**learner)
        self.algo = AlgorithmConfig(**algorithm)
        pin_process(cpu_cores, sharers=world_size * concurrent_roles)
        init_distributed(rank, world_size, master_addr, master_port)
        self.rank, self.world_size, self.offload_optimizer = rank, world_size, offload_optimizer
        torch.manual_seed(seed)

    def build(self, module: torch.nn.Module, optim: OptimConfig, generator_seed: int) -> None:
        """The DeepSpeed engine over `module` (AdamW with `optim`) and the mini-batch generator."""
        self.engine = build_engine(module, optim, self.learner_cfg.zero_stage, self.model_cfg.dtype,
                                   self.world_size, self.offload_optimizer)
        self.generator = torch.Generator().manual_seed(generator_seed)
        self.device = self.engine.device

    def micro_batches(self, samples: list) -> list[PackedMicroBatch]:
        """This rank's packed micro-batches of the samples."""
        return rank_share(samples, self.rank, self.world_size, self.learner_cfg.micro_batch_tokens)

    def backward(self, loss: torch.Tensor, mb: PackedMicroBatch, last: bool) -> None:
        """Backward one micro-batch's loss (already divided by the whole mini-batch's token count), scaled
        by world_size so DeepSpeed's average over ranks is the single-rank gradient; a padding micro-batch
        (a weight-0 repeat that keeps the ranks' collectives in step) contributes nothing."""
        accumulate(self.engine, loss * (0.0 if mb.padding else self.world_size), last=last)

    def save(self, directory: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler) plus the generator state (every rank)."""
        self.engine.save_checkpoint(directory, tag=tag, client_state={"generator": self.generator.get_state()})

    def load(self, directory: str, tag: str) -> None:
        """Restore what `save` wrote (every rank)."""
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if client and "generator" in client:
            self.generator.set_state(client["generator"])
