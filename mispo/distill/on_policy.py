"""On-policy distillation (`merge.method: on_policy`): the student samples, each domain's expert
scores the student's own tokens, and the student moves toward the expert by a per-token reverse KL.

Per generated token t of a student sample on domain d (env / tool tokens excluded):

    A_t = log pi_expert_d(a_t | s_t) - log pi_old(a_t | s_t)        # minus the sampled reverse KL
    L   = - E[ I_token * I_traj * A_t * log pi_theta(a_t | s_t) ]    # the MIS-PO loss, A_t per token

whose gradient at pi_theta = pi_old is -grad KL(pi_theta || pi_expert) estimated token by token
(no credit to later tokens). The MIS-PO filters on pi_old / pi_rollout keep the engine-vs-learner
mismatch out, as in RL. At `merge.temperature` T every log-prob (student, expert) is of softmax(logits / T),
the distribution the engine sampled from, so the filters compare like with like.

It is an ordinary trainer run (`mispo.loop.trainer.Trainer`) of the recipe `student_recipe` builds:
`algorithm.advantage: reverse_kl` with the experts as `algorithm.teachers`. So it has the trainer's
checkpoints (an interrupted merge, rerun into the same DIR, resumes at its last one), async mode
(`trainer.mode` of the merge recipe), restarts and logging. Run folder: DIR/on_policy (metrics.jsonl
with distill/reverse_kl, and distill/<domain>/reverse_kl when there are several domains).
"""

from __future__ import annotations

import os
from pathlib import Path

from mispo.config import DOMAIN_ROLLOUT_KEYS, AlgorithmConfig, DomainRef, OptimConfig, Recipe, RolloutConfig


def student_recipe(merge) -> Recipe:
    """The trainer recipe of the merge's on-policy distillation: the student at `model.path`, the merge's domains
    (sampled at merge.temperature, merge.samples_per_prompt per prompt, merge.prompts_per_step a step), the MIS-PO
    loss with the recipe's bands and reverse-KL advantages from each domain's expert, merge.steps updates at
    merge.lr; the merge recipe's learner, trainer (mode, checkpoints, loggers) and resources otherwise."""
    r, cfg = merge.recipe, merge.cfg
    same_sampling = [f"rollout.temperature={cfg.temperature}", "rollout.top_p=1.0",
                     "rollout.partial_rollout_tokens=null"]  # how the student samples is the merge's
    domains = {name: DomainRef(recipe=ref.recipe, weight=ref.weight,
                               overrides=[*ref.overrides, *same_sampling])
               for name, ref in cfg.experts.items()}
    algorithm = AlgorithmConfig(policy_loss="mispo", advantage="reverse_kl", token_bounds=r.algorithm.token_bounds,
                                traj_bounds=r.algorithm.traj_bounds,
                                traj_stat_includes_rejected=r.algorithm.traj_stat_includes_rejected,
                                teachers={name: str(path) for name, path in merge.experts.items()})
    actor = OptimConfig(lr=cfg.lr, warmup_steps=min(5, cfg.steps // 4), weight_decay=0.0)
    return Recipe(
        name="on_policy",
        model=r.model.model_copy(update={"path": str(merge.student)}),
        rollout=RolloutConfig(**{**r.rollout.model_dump(exclude=set(DOMAIN_ROLLOUT_KEYS)),  # the domains' own
                                 "temperature": cfg.temperature, "top_p": 1.0, "partial_rollout_tokens": None,
                                 "n_samples": cfg.samples_per_prompt, "prompts_per_step": cfg.prompts_per_step}),
        algorithm=algorithm,
        learner=r.learner.model_copy(update={"actor": actor, "critic": None}),
        trainer=r.trainer.model_copy(update={"max_steps": cfg.steps, "eval_every": 0}),
        resources=r.resources,
        domains=domains,
        source=r.source,
    )


def distill_on_policy(merge, model_dir: Path) -> None:
    """`merge.cfg.steps` student updates through the trainer; the student is written to `model_dir` (release
    format). The run folder is model_dir's sibling `on_policy/`; a rerun resumes from its last checkpoint."""
    from mispo.loop.trainer import Trainer

    run = model_dir.with_name("on_policy")
    trainer = Trainer(student_recipe(merge), run)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    os.replace(run / "final", model_dir)
