"""A frozen model that scores other models' samples (run as a Ray actor): the domain expert of
on-policy distillation, whose per-token log-probs on the student's own samples give the reverse KL.

    logp_teacher = worker.compute_logprobs(batch)   # [B, T], no grad

Alone (a plain actor) it scores every row. As N ranks of a `LearnerGroup` each rank scores its share
of the rows (`mispo.learner.data_parallel`; the other rows are 0, so the ranks' answers sum to the
whole), and with `zero_stage` 3 the teacher is sharded over the ranks (`frozen_model.py`):

    teacher = LearnerGroup(TeacherWorker, options, path, cpu_ranks=n, zero_stage=3, ...)
    logp_teacher = sum(teacher.all(TeacherWorker.compute_logprobs, ray.put(batch)))   # every rank, the whole batch
"""

from __future__ import annotations

import torch

from mispo.batch import RolloutBatch
from mispo.infra.cpu_split import pin_process
from mispo.learner.data_parallel import rank_share
from mispo.learner.engine import init_distributed
from mispo.learner.frozen_model import frozen_model
from mispo.learner.packing import response_logprobs


class TeacherWorker:
    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_tokens: int = 4096,
                 num_threads: int = 0, temperature: float = 1.0, zero_stage: int = 0, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500):
        """`temperature`: log-probs are of softmax(logits / T), the student's sampling distribution's form.
        `zero_stage` 3 shards the teacher over the `world_size` ranks (their process group is joined at
        `master_addr:master_port`); any other stage keeps a whole copy on each rank. `num_threads` 0: the
        process's cores shared by the ranks (the teacher scores while the student's learners wait)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        else:
            pin_process(None, sharers=world_size)
        if zero_stage == 3:
            init_distributed(rank, world_size, master_addr, master_port)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.model = frozen_model(model_path, dtype, zero_stage, self.device)
        self.micro_batch_tokens = micro_batch_tokens
        self.temperature = temperature

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T] log p_teacher of each response token of this rank's rows (zeros past each response and
        in other ranks' rows), fp32 on CPU. Under ZeRO-3 every rank must call it with the same batch."""
        micro = rank_share(batch.samples, self.rank, self.world_size, self.micro_batch_tokens)
        return response_logprobs(self.model, batch.samples, self.micro_batch_tokens, self.device, micro,
                                 temperature=self.temperature)
