"""The policy learner: a DeepSpeed engine over the policy model (run as Ray actors by the trainer,
one per data-parallel rank, through `mispo.learner.group.LearnerGroup`).

    logp_old = worker.compute_logprobs(batch)      # pi_old at the rollout's weights, no grad
    metrics  = worker.train(batch)                 # one epoch over `actor_mini_batches` mini-batches
    buckets  = worker.weight_buckets(bytes)        # release-named tensors for the rollout engines

Every rank receives the whole batch and works on its share (`mispo.learner.data_parallel`): forward
passes fill only the share's rows (the group sums the ranks' results), and each loss is divided by the
whole mini-batch's token count and scaled by world_size, so DeepSpeed's gradient average over ranks
gives exactly the single-rank gradient.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from mispo.algorithms import PolicyLossInputs, compute_policy_loss
from mispo.batch import RolloutBatch
from mispo.families import family_of
from mispo.learner.engine import average_over_ranks, full_parameters, optimizer_step, partitioned_load
from mispo.learner.frozen_model import frozen_model
from mispo.learner.group import rank0_only
from mispo.learner.metrics import combine_partials, mean_metrics, mini_batches, peak_rss_gib
from mispo.learner.models import load_policy
from mispo.learner.packing import PackedMicroBatch, forward_logprobs, gather_response, response_logprobs
from mispo.learner.worker_base import LearnerWorker
from mispo.weights.transport import bucketize, put_bucket


class PolicyWorker(LearnerWorker):
    """Owns the policy's DeepSpeed engine (and an optional frozen reference model for KL); set-up,
    `micro_batches`, `save` and `load` are `LearnerWorker`'s."""

    def __init__(self, model_path: str, model: dict, learner: dict, algorithm: dict, max_new_tokens: int,
                 rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 seed: int = 0, cpu_cores: list[int] | None = None, temperature: float = 1.0,
                 concurrent_roles: int = 1, offload_optimizer: bool = False):
        """`temperature`: the rollouts' sampling temperature; every log-prob is of softmax(logits / T), the
        distribution the engine sampled from (its log-probs are processed ones). `cpu_cores`, `concurrent_roles`,
        `offload_optimizer`: LearnerWorker's."""
        super().__init__(model, learner, algorithm, rank, world_size, master_addr, master_port, seed, cpu_cores,
                         concurrent_roles, offload_optimizer)
        self.model_path = model_path
        self._checkpoint_shapes = None  # {name: shape} of model_path's tensors, read at the first sync
        self.versions = self.spare = None  # mismatch attribution: kept weights, the model that scores with them
        module = self._policy_module(partitioned=self.learner_cfg.zero_stage == 3)
        self.family = family_of(module)
        self.experts = None  # expert parallel: this rank's routed experts, outside DeepSpeed
        if self.learner_cfg.expert_parallel > 1:
            from mispo.learner.expert_parallel import ShardedExperts
            if self.model_cfg.lora is not None:
                raise ValueError("learner.expert_parallel with model.lora: the adapters cover the experts DeepSpeed "
                                 "no longer holds; fix: remove one of them")
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            self.experts = ShardedExperts(module, self.learner_cfg.expert_parallel, rank, world_size,
                                          self.learner_cfg.actor, device or torch.device("cpu"),
                                          offload=self.learner_cfg.expert_optimizer_offload)
        self.build(module, self.learner_cfg.actor, generator_seed=seed)
        self.reference = None
        if self.learner_cfg.reference:  # frozen; sharded over the ranks like the actor under ZeRO-3
            self.reference = frozen_model(model_path, self.model_cfg.dtype, self.learner_cfg.zero_stage,
                                          self.engine.device, self.model_cfg.attn_backend, self.model_cfg.moe_backend)
        self.loss_config = self.algo.loss_config(max_new_tokens)
        self.temperature = temperature

    def _policy_module(self, partitioned: bool = False) -> torch.nn.Module:
        """The policy as the recipe wants it (dtype, backends, fp32 head, frozen router, LoRA adapters);
        `partitioned` (ZeRO-3 without LoRA; every rank): built partitioned, no rank holding the whole model."""
        cfg = self.model_cfg
        partitioned = partitioned and cfg.lora is None
        with partitioned_load(self.model_path, cfg.dtype) if partitioned else contextlib.nullcontext():
            module = load_policy(self.model_path, cfg.dtype, cfg.gradient_checkpointing, cfg.attn_backend,
                                 cfg.moe_backend, cfg.fp32_lm_head)
        if cfg.freeze_router:  # MoE routers stop training (no-op on a dense model)
            family_of(module).freeze_router(module)
        if cfg.lora is not None:  # only the adapters train; syncs and exports are merged
            from mispo.learner.lora import apply_lora
            module = apply_lora(module, cfg.lora.model_dump())
        return module

    def has_dropout(self) -> bool:
        """Whether a train-mode forward is random (a dropout module or a config `*dropout` above 0): then
        the update's first forward is not pi_old, and `train` needs batch.old_logprobs."""
        module = self.engine.module
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules()):
            return True
        config = getattr(module, "config", None)
        values = config.to_dict().items() if config is not None else ()
        return any(k.endswith("dropout") and isinstance(v, (int, float)) and v > 0 for k, v in values)

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """{"old_logprobs": [B, T]} (and "ref_logprobs" with a reference model), fp32, on CPU; rows
        outside this rank's share are 0."""
        self.engine.eval()
        tokens, micro = self.learner_cfg.micro_batch_tokens, self.micro_batches(batch.samples)
        t = self.temperature
        out = {"old_logprobs": response_logprobs(self.engine, batch.samples, tokens, self.device, micro, t)}
        if self.reference is not None:  # the actor's micro-batches: under ZeRO-3 the same count on every rank
            out["ref_logprobs"] = response_logprobs(self.reference, batch.samples, tokens, self.device, micro, t)
        return out

    # ------------------------------------------------------------------ mismatch attribution (rank 0 alone)
    @rank0_only
    def keep_version(self, version: int, keep: int) -> None:
        """Keep a CPU copy of the current weights as `version` (and the `keep` versions before it); the first
        call also builds the spare model that `attribute_mismatch` scores on (mismatch_attribution.py)."""
        from mispo.learner.mismatch_attribution import VersionStore

        if self.versions is None:
            self.versions, self.spare = VersionStore(keep), self._policy_module().to(self.device).eval()
        self.versions.add(version, self.engine.module.state_dict())

    @rank0_only
    @torch.no_grad()
    def attribute_mismatch(self, batch: RolloutBatch, version: int) -> dict[str, float]:
        """mismatch/total, from_staleness, from_engine of the batch with the learner at `version`: each token
        scored by the weights that sampled it and by the current ones, on the spare model."""
        from mispo.learner.mismatch_attribution import attribute

        if self.versions is None or version not in self.versions:
            raise RuntimeError(f"attribute_mismatch at version {version}: no copy of those weights; the trainer "
                               "calls keep_version after every update")
        return attribute(batch, version, self.versions, self._score_at_version(batch))

    @rank0_only
    @torch.no_grad()
    def version_logprobs(self, batch: RolloutBatch, version: int) -> dict:
        """{"version_logprobs": [B, T] log pi_v, "lag/unscored_tokens": n}: each response token scored by the
        learner at the weights that sampled it (mismatch_attribution.logprobs_at_versions), the stale ones on
        the spare model, one forward per kept version over the rows it sampled."""
        from mispo.learner.mismatch_attribution import logprobs_at_versions

        if self.versions is None:
            raise RuntimeError("version_logprobs: no copies of earlier weights; the trainer calls keep_version "
                               "after every update")
        values, unscored = logprobs_at_versions(batch, version, self.versions, self._score_at_version(batch))
        return {"version_logprobs": values, "lag/unscored_tokens": float(unscored)}

    def _score_at_version(self, batch: RolloutBatch):
        """score(v, rows) -> [len(rows), T_v] log-probs of those rows' responses under the kept weights v."""
        samples, tokens, t = batch.samples, self.learner_cfg.micro_batch_tokens, self.temperature

        def score(v: int, rows: list[int]) -> torch.Tensor:
            self.spare.load_state_dict(self.versions[v])
            return response_logprobs(self.spare, [samples[i] for i in rows], tokens, self.device, temperature=t)

        return score

    # ------------------------------------------------------------------ update
    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """One pass over the batch in `actor_mini_batches` optimizer steps; returns averaged metrics.
        Without batch.old_logprobs (one mini-batch only) the first forward provides pi_old: it runs at the
        rollout-time weights, so pi_old = sg(pi_theta) there and the loss computes the MIS-PO masks."""
        if batch.old_logprobs is None and self.learner_cfg.actor_mini_batches != 1:
            raise ValueError("PolicyWorker.train without old_logprobs needs learner.actor_mini_batches = 1")
        self.engine.train()
        start = time.time()
        parts, grad_norms = [], []
        for rows in mini_batches(len(batch), self.learner_cfg.actor_mini_batches, self.generator):
            mini = batch.select(rows)
            num_tokens = float(mini.response_mask.sum())
            micro, pieces = self.micro_batches(mini.samples), []
            for i, mb in enumerate(micro):
                loss, metrics = self._micro_loss(mini, mb, num_tokens)
                self.backward(loss, mb, last=i == len(micro) - 1)
                if not mb.padding:
                    pieces.append(metrics)
            if pieces:
                parts.append(combine_partials(pieces))
            norm = self._optimizer_step()
            if norm is not None:
                grad_norms.append(norm)
        out = mean_metrics(parts)
        if grad_norms:
            out["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
            out["actor/grad_norm_max"] = max(grad_norms)
        out["actor/lr"] = self.engine.get_lr()[0]
        out["time/actor_train_s"] = time.time() - start
        out["mem/actor_peak_rss_gib_max"] = peak_rss_gib()  # the largest rank's
        return out

    def _micro_loss(self, mini: RolloutBatch, mb: PackedMicroBatch, num_tokens: float):
        sub = mini.select(mb.rows)
        length = sub.response_mask.shape[1]
        logp_all, ent_all = forward_logprobs(self.engine, mb, self.device, self.temperature, with_entropy=True)
        logp = gather_response(logp_all, mb, length)
        ent = gather_response(ent_all, mb, length)
        if self.loss_config.entropy_coef == 0:
            ent = ent.detach()  # a metric only
        d = self.device
        mask = sub.response_mask.to(d)
        logp_old = sub.old_logprobs.to(d) if sub.old_logprobs is not None else logp.detach()
        with torch.no_grad():  # KL(pi_theta || pi_old) = E_old[r log r], r = pi_theta / pi_old
            log_r = (logp - logp_old) * mask
            kl_to_old = float((torch.exp(log_r) * log_r * mask).sum() / max(num_tokens, 1.0))
        inputs = PolicyLossInputs(
            logp=logp, logp_old=logp_old, advantages=sub.advantages.to(d),
            mask=mask, logp_rollout=sub.rollout_logprobs.to(d),
            logp_ref=sub.ref_logprobs.to(d) if sub.ref_logprobs is not None else None, entropy=ent,
            logp_version=sub.version_logprobs.to(d) if sub.version_logprobs is not None else None,
            token_keep=sub.token_keep.to(d) if sub.token_keep is not None else None,
            traj_keep=sub.traj_keep.to(d) if sub.traj_keep is not None else None,
            num_tokens=num_tokens, num_seqs=float(len(mini)),
        )
        loss, metrics = compute_policy_loss(self.algo.policy_loss, inputs, self.loss_config)
        return loss, {**{k: float(v) for k, v in metrics.items()}, "actor/kl_to_old": kl_to_old}

    def _optimizer_step(self) -> float | None:
        """One optimizer step at the mini-batch boundary: DeepSpeed's, then the expert shards' (clipped by
        the whole model's norm); returns the gradient norm (None when DeepSpeed reports none)."""
        if self.experts is not None:
            self.experts.reduce_grads()
        norm = optimizer_step(self.engine)
        if self.experts is not None:
            return self.experts.step(float(norm or 0.0))
        return norm

    def sft_step(self, samples: list) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning: token-mean cross-entropy of the response
        tokens whose loss_mask is 1 (prompts are context only)."""
        self.engine.train()
        batch = RolloutBatch.from_samples(samples)
        num_tokens = float(batch.response_mask.sum())
        micro = self.micro_batches(samples)
        total = 0.0
        for i, mb in enumerate(micro):
            sub = batch.select(mb.rows)
            logp = gather_response(forward_logprobs(self.engine, mb, self.device)[0], mb, sub.response_mask.shape[1])
            loss = -(logp * sub.response_mask.to(self.device)).sum() / max(num_tokens, 1.0)
            self.backward(loss, mb, last=i == len(micro) - 1)
            total += 0.0 if mb.padding else loss.item()
        self._optimizer_step()
        return {"sft/loss": total, "sft/lr": self.engine.get_lr()[0]}  # this rank's part of the loss

    # ------------------------------------------------------------------ weights and checkpoints
    @torch.no_grad()
    def weight_buckets(self, bucket_bytes: int = 256 << 20) -> list[list[tuple[str, torch.Tensor]]]:
        """Every tensor of the checkpoint the engines loaded, from the live model (the family's checkpoint
        names and layout: per-expert tensors for transformers MoEs, release names for Step3p5; router biases
        included; with LoRA the adapters merged in), in buckets of about `bucket_bytes`, on CPU. The names and
        shapes are checked against the checkpoint's (`sync_guard.check_sent_names`): a mismatch is an error.
        Under ZeRO-3 the shards are gathered first (every rank must call it); ranks other than 0 return []."""
        module = self.engine.module
        with full_parameters(module, self.learner_cfg.zero_stage):
            copy = self.learner_cfg.zero_stage == 3  # gathered tensors are freed when the context exits
            experts = self.experts.full_state() if self.experts is not None else {}  # EP: every rank gathers
            state = {k: (v.detach().cpu().clone() if copy else v.detach().cpu())
                     for k, v in self._state_dict(module).items()} if self.rank == 0 else {}
        if self.rank != 0:
            return []
        state = self.family.checkpoint_state(module, {**state, **experts})
        self._check_names(state)
        return bucketize(state.items(), bucket_bytes)

    def _check_names(self, state: dict[str, torch.Tensor]) -> None:
        from mispo.weights.sync_checks import check_sent_names, checkpoint_shapes

        if self._checkpoint_shapes is None:
            self._checkpoint_shapes = checkpoint_shapes(self.model_path)
        check_sent_names({k: tuple(v.shape) for k, v in state.items()}, self._checkpoint_shapes, self.family.name,
                         f"{self.model_path}")

    @torch.no_grad()
    def probe_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """[B, L - 1] log p(token t | tokens < t) of each fixed sequence at temperature 1 (the sync probe,
        `mispo.loop.sync_guard`); every rank scores all of them (the same micro-batches: ZeRO-3 collectives)."""
        from mispo.batch import Sample
        from mispo.learner.packing import pack_samples

        self.engine.eval()
        samples = [Sample(prompt_ids=s[:1], response_ids=s[1:], rollout_logprobs=[0.0] * (len(s) - 1),
                          loss_mask=[1] * (len(s) - 1), finish_reason="stop") for s in sequences]
        micro = pack_samples(samples, list(range(len(samples))), self.learner_cfg.micro_batch_tokens)
        return response_logprobs(self.engine, samples, self.learner_cfg.micro_batch_tokens, self.device, micro, 1.0)

    def _state_dict(self, module) -> dict[str, torch.Tensor]:
        if self.model_cfg.lora is None:
            return module.state_dict()
        from mispo.learner.lora import merged_state_dict
        return merged_state_dict(module)

    def save(self, directory: str, tag: str) -> None:
        super().save(directory, tag)
        if self.experts is not None:
            self.experts.save(directory, tag)

    def load(self, directory: str, tag: str) -> None:
        super().load(directory, tag)
        if self.experts is not None:
            self.experts.load(directory, tag)

    def weight_bucket_refs(self, bucket_bytes: int = 256 << 20) -> list:
        """`weight_buckets` put into the Ray object store from here (one copy, read zero-copy by the
        rollout workers); returns the ObjectRefs ([] on ranks other than 0)."""
        return [put_bucket(b) for b in self.weight_buckets(bucket_bytes)]

    def broadcast_weights(self, group: dict, bucket_bytes: int = 256 << 20) -> list:
        """`weight_buckets` (every rank calls it: ZeRO-3 gathers) broadcast by rank 0 to the rollout engines'
        vLLM workers over the sync group `group` (`mispo.weights.broadcast`; rank 0 of that group, apart from
        the learners' own), then put into the object store for a restarted engine's re-sync; returns those
        ObjectRefs ([] on ranks other than 0)."""
        from mispo.weights.broadcast import join, send_buckets

        buckets = self.weight_buckets(bucket_bytes)
        if self.rank != 0:
            return []
        send_buckets(join(group, 0, self.device), buckets)
        return [put_bucket(b) for b in buckets]

    def update_router_bias(self, rate: float) -> None:
        """Loss-free balancing step on the routing of the last forward (no-op on non-MoE models); with
        several ranks the expert loads are averaged over them first, so every rank moves its biases alike."""
        module = self.engine.module
        family_of(module).update_router_bias(module, rate, reduce=average_over_ranks if self.world_size > 1 else None)

    def routing_stats(self) -> dict[str, float]:
        return family_of(self.engine.module).routing_stats(self.engine.module)

    def export(self, directory: str) -> str:
        """Write the policy as a Hugging Face / release-format checkpoint (with LoRA: merged). Every rank
        calls it (ZeRO-3 gathers the shards); rank 0 writes."""
        with full_parameters(self.engine.module, self.learner_cfg.zero_stage):
            experts = self.experts.full_state() if self.experts is not None else None  # EP: every rank gathers
            if self.rank == 0:
                Path(directory).mkdir(parents=True, exist_ok=True)
                if self.model_cfg.lora is not None:
                    from mispo.learner.lora import export_merged
                    export_merged(self.engine.module, directory)
                elif experts is not None:
                    state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
                    self.engine.module.save_pretrained(directory, state_dict={**state, **experts})
                else:
                    self.engine.module.save_pretrained(directory)
        return directory
