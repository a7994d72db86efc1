"""The processes a run trains with, started from the recipe in one place and handed to the `Trainer`:

    roles = start_roles(recipe, policy_path, cores, timeouts, max_new_tokens)   # Ray, placement, groups
    Trainer(recipe, output, roles=start_roles)                   # the default; tests pass in-process fakes

With `algorithm.advantage: reverse_kl` (on-policy distillation) the roles include one frozen teacher group per
domain (`TeacherWorker`, `algorithm.teachers`), sharded over `learner.ranks` under ZeRO-3 like the policy.

The trainer's loop only calls the groups' methods (`submit / wait / all / first / rank0 / share / kill` on
learner groups, `generate / sync / sync_broadcast / probe_logprobs / shutdown` on the engines), so `fit()`
runs the same against fakes that answer in-process (tests/trainer/test_fit_with_fake_roles.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mispo.infra.call_timeout import CallTimeouts
from mispo.config import Recipe


@dataclass
class Roles:
    """policy / critic: learner groups (critic None without GAE); engines: the rollout group;
    start_learners(): fresh learner groups at the starting policy's weights (a restart after a death);
    placement: the GPU placement groups (None on a CPU run), removed at shutdown;
    teachers: {domain: frozen teacher group} for advantage reverse_kl (else empty)."""

    policy: Any
    critic: Any
    engines: Any
    start_learners: Callable[[], tuple[Any, Any]]
    placement: Any = None
    teachers: dict[str, Any] = field(default_factory=dict)

    def shutdown(self) -> None:
        self.engines.shutdown()
        for group in (self.policy, self.critic, *self.teachers.values()):
            if group is not None:
                group.kill()
        if self.placement is not None:
            self.placement.remove()


def start_roles(recipe: Recipe, policy_path: str, cores, timeouts: CallTimeouts, max_new_tokens: int) -> Roles:
    """Start (or join) Ray, place the roles, start the policy and critic learner groups and the rollout engines
    at `policy_path`'s weights; `cores` is the CPU split of a CPU run, `timeouts` every call's time limit,
    `max_new_tokens` the longest response any domain asks for (the policy's token-sum normaliser)."""
    from mispo.infra.cluster import start_ray
    from mispo.learner.critic_worker import CriticWorker
    from mispo.learner.group import LearnerGroup
    from mispo.learner.policy_worker import PolicyWorker
    from mispo.infra.placement import learner_options, place_roles
    from mispo.rollout.group import RolloutGroup

    r = recipe
    start_ray(r.trainer.ray_address)
    with_critic = r.learner.critic is not None and r.algorithm.advantage == "gae"
    # None on a CPU run (unless resources.node_resources places roles on nodes)
    placement = place_roles(r.resources, with_critic, r.rollout.num_workers, learner_ranks=r.learner.ranks)

    def start_learners():
        common = dict(model=r.model.model_dump(), learner=r.learner.model_dump(),
                      algorithm=r.algorithm.model_dump(), seed=r.trainer.seed, cpu_cores=cores.learner,
                      concurrent_roles=2 if with_critic else 1,  # policy and critic compute at the same time
                      offload_optimizer=r.resources.offload_optimizer)
        actor_opts, critic_opts = learner_options(placement, with_critic)
        ranks = r.learner.ranks  # CPU runs; a GPU run has one rank per placed GPU
        policy = LearnerGroup(PolicyWorker, actor_opts, policy_path, cpu_ranks=ranks,
                              max_new_tokens=max_new_tokens,
                              temperature=r.rollout.temperature, **common)
        critic = LearnerGroup(CriticWorker, critic_opts, policy_path, cpu_ranks=ranks,
                              **common) if with_critic else None
        for group in (policy, critic):
            if group is not None:
                group.timeouts = timeouts
        return policy, critic

    policy, critic = start_learners()
    engines = RolloutGroup(policy_path, r.rollout, dtype=r.rollout.dtype or r.model.dtype, seed=r.trainer.seed,
                           options=placement.rollout.options if placement else None,
                           tensor_parallel=r.resources.rollout_tensor_parallel,
                           expert_parallel=r.resources.rollout_expert_parallel, cpu_cores=cores.rollout,
                           fp32_lm_head=r.model.fp32_lm_head, timeouts=timeouts)
    return Roles(policy, critic, engines, start_learners, placement, start_teachers(r, timeouts))


def start_teachers(recipe: Recipe, timeouts: CallTimeouts) -> dict:
    """{domain: TeacherWorker group} at `algorithm.teachers`' checkpoints (advantage reverse_kl), scoring at the
    rollouts' temperature; each takes one GPU on a GPU cluster (outside the roles' placement groups)."""
    from mispo.infra.cluster import standalone_learner_options
    from mispo.config import resolve_path
    from mispo.learner.group import LearnerGroup
    from mispo.learner.teacher_worker import TeacherWorker

    r, teachers = recipe, {}
    for name, path in r.algorithm.teachers.items():
        teachers[name] = LearnerGroup(TeacherWorker, standalone_learner_options(), str(resolve_path(r, path)),
                                      r.model.dtype, r.learner.micro_batch_tokens, cpu_ranks=r.learner.ranks,
                                      temperature=r.rollout.temperature, zero_stage=r.learner.zero_stage)
        teachers[name].timeouts = timeouts
    return teachers
