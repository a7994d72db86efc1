"""On-policy distillation (`merge.method: on_policy`): the student samples, each domain's expert
scores the student's own tokens, and the student moves toward the expert by a per-token reverse KL.

Per generated token t of a student sample on domain d (env / tool tokens excluded):

    A_t = log pi_expert_d(a_t | s_t) - log pi_old(a_t | s_t)        # minus the sampled reverse KL
    L   = - E[ I_token * I_traj * A_t * log pi_theta(a_t | s_t) ]    # the MIS-PO loss, A_t per token

whose gradient at pi_theta = pi_old is -grad KL(pi_theta || pi_expert) estimated token by token
(no credit to later tokens). The MIS-PO filters on pi_old / pi_rollout keep the engine-vs-learner
mismatch out, as in RL. At `merge.temperature` T every log-prob (student, expert) is of softmax(logits / T),
the distribution the engine sampled from, so the filters compare like with like. Logged: distill/reverse_kl (mean of log pi_old - log pi_expert over model
tokens), per domain when there are several.
"""

from __future__ import annotations

import os
import time

import ray
import torch

from mispo.batch import RolloutBatch
from mispo.cluster import standalone_learner_options
from mispo.domains import draw_step, generate_step, step_seed
from mispo.metrics_log import MetricsLog
from mispo.prepare_update import set_mispo_masks


def distill_on_policy(merge, model_dir) -> None:
    """`merge.cfg.steps` student updates; writes the student to `model_dir` (release format)."""
    from mispo.config import AlgorithmConfig, OptimConfig
    from mispo.learner.data_parallel import merge_row_results
    from mispo.learner.group import LearnerGroup
    from mispo.learner.metrics import combine_partials
    from mispo.learner.policy_worker import PolicyWorker
    from mispo.learner.teacher_worker import TeacherWorker

    r, cfg = merge.recipe, merge.cfg
    algorithm = AlgorithmConfig(policy_loss="mispo", advantage="grpo", token_bounds=r.algorithm.token_bounds,
                                traj_bounds=r.algorithm.traj_bounds,
                                traj_stat_includes_rejected=r.algorithm.traj_stat_includes_rejected)
    learner = r.learner.model_copy(update={"actor": OptimConfig(lr=cfg.lr, warmup_steps=min(5, cfg.steps // 4),
                                                                weight_decay=0.0)})
    policy = LearnerGroup(PolicyWorker, standalone_learner_options(), str(merge.student), cpu_ranks=learner.ranks,
                          model=r.model.model_dump(), learner=learner.model_dump(), algorithm=algorithm.model_dump(),
                          max_new_tokens=max(d.max_new_tokens for d in merge.domains), seed=r.trainer.seed,
                          temperature=cfg.temperature)
    teachers = {d.name: LearnerGroup(TeacherWorker, standalone_learner_options(), str(merge.experts[d.name]),
                                     r.model.dtype, r.learner.micro_batch_tokens, cpu_ranks=learner.ranks,
                                     temperature=cfg.temperature, zero_stage=r.learner.zero_stage)
                for d in merge.domains}  # sharded over the ranks under ZeRO-3, like the student
    samplers = {d.name: d.sampler() for d in merge.domains}
    run = MetricsLog(model_dir.with_name("on_policy"))
    merge.evaluator.load(merge.student)
    try:
        for step in range(1, cfg.steps + 1):
            start = time.time()
            jobs = draw_step(merge.domains, samplers, cfg.prompts_per_step, merge.tokenizer)
            parts = [(d.name, samples) for d, samples in generate_step(
                merge.rollout, jobs, cfg.samples_per_prompt, cfg.temperature, seed=step_seed(r.trainer.seed, step))
                if samples]
            batch = RolloutBatch.from_samples([s for _, samples in parts for s in samples])
            logp = merge_row_results(policy.all(PolicyWorker.compute_logprobs, ray.put(batch)))  # each rank its rows
            batch.old_logprobs = logp["old_logprobs"]
            teacher, metrics, row = torch.zeros_like(batch.old_logprobs), {}, 0
            for name, samples in parts:
                rows = list(range(row, row + len(samples)))
                sub = sum(teachers[name].all(TeacherWorker.compute_logprobs, ray.put(batch.select(rows))))  # ranks' rows
                teacher[rows, : sub.shape[1]] = sub
                if len(parts) > 1:
                    metrics[f"distill/{name}/reverse_kl"] = _reverse_kl(batch.select(rows).old_logprobs, sub,
                                                                        batch.select(rows).response_mask)
                row += len(samples)
            mask = batch.response_mask
            metrics["distill/reverse_kl"] = _reverse_kl(batch.old_logprobs, teacher, mask)
            batch.advantages = (teacher - batch.old_logprobs) * mask
            set_mispo_masks(batch, algorithm)  # the trainer's filters, with the recipe's bands
            metrics.update(combine_partials(policy.all(PolicyWorker.train, ray.put(batch))))
            merge.rollout.sync(policy.first(PolicyWorker.weight_bucket_refs), version=step)
            merge.evaluator.loaded = None  # the engine now serves the updated student
            metrics["time/step_s"] = time.time() - start
            run.log(step, metrics)
        tmp = str(model_dir) + ".tmp"
        policy.all(PolicyWorker.export, tmp)
        merge.tokenizer.save_pretrained(tmp)
        os.replace(tmp, model_dir)
    finally:
        run.close()
        policy.kill()
        for group in teachers.values():
            group.kill()


def _reverse_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over model tokens of log pi_student - log pi_teacher (the sampled per-token reverse KL)."""
    return float(((logp_student - logp_teacher) * mask).sum() / mask.sum().clamp(min=1))
