"""The MIS-PO training loop, readable top to bottom.

One step:  prompts -> rollout workers (vLLM) -> rewards -> pi_old log-probs and values (learners)
           -> advantages -> MIS-PO masks -> actor and critic updates -> weight sync -> log, checkpoint.
Rollout workers and learners are Ray actors; this driver only moves batches between them.

Sync mode (the default): a step's rollouts start after the previous step's weight sync, so every sample
is on-policy (staleness 0). Async mode (`trainer.max_staleness: s >= 1`): the rollouts of the next s steps
are generated while the current step trains; every sample carries the version of the weights that
generated it, and one more than s versions behind the learner is dropped and counted (`staleness.py`).
With `rollout.partial_rollout_tokens` a rollout is generated in segments and a sync lands between them
(`rollout/partial.py`): a sample's tokens may then come from several versions, the oldest counting.
MIS-PO's filters handle the remaining mismatch. Each step's sampling is seeded from the run's seed and
the step, so a resumed run draws the same prompts and samples as an uninterrupted one.

Run folder: recipe.yaml, metrics.jsonl + tensorboard/ and the other `trainer.loggers` (`metrics_log.py`),
checkpoints/ (`checkpoint_store.py`), final/ (the trained policy in Hugging Face / release format), and
logs/run.log (the libraries' and Ray workers' output of a quiet `mispo train`, `run_log.py`).
"""

from __future__ import annotations

import random
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch
from rich.console import Console

from mispo.batch import RolloutBatch
from mispo.infra.call_timeout import CallTimedOut, CallTimeouts
from mispo.weights.checkpoint_store import CheckpointStore, final_save, periodic_save, write_failure
from mispo.infra.cluster import check_shared_storage, start_ray
from mispo.config import Recipe, dump_recipe
from mispo.infra.cpu_split import run_split
from mispo.loop.domains import draw_step, generate_step, load_domains, step_seed
from mispo.loop.dynamic_sampling import fill_batch, no_variance_streak
from mispo.families import family_of
from mispo.families.preflight import check_policy
from mispo.learner.critic_worker import CriticWorker
from mispo.learner.data_parallel import merge_row_results
from mispo.learner.metrics import combine_partials
from mispo.learner.mismatch_attribution import logprobs_at_versions
from mispo.learner.policy_worker import PolicyWorker
from mispo.loop.metrics_log import MetricsLog
from mispo.prepare_model import starting_policy
from mispo.loop.prepare_update import adaptive_band, lag_diagnostics, prepare_update, reverse_kl
from mispo.loop.roles import Roles, start_roles
from mispo.loop.progress import StepProgress
from mispo.rollout.agent_episodes import serve_agents
from mispo.loop.staleness import drop_stale
from mispo.loop.sync_guard import SyncProbe, fp32_sync_warning

console = Console(stderr=True)


@dataclass
class PendingRollout:
    """One step's rollouts in flight: `index` numbers the rollouts of the run (its sampling seed);
    `sampler_states` are the prompt samplers' states before its prompts were drawn (a checkpoint taken
    while it is in flight resumes from them, so its prompts are neither lost nor repeated)."""

    index: int
    future: Future
    sampler_states: dict
    data_metrics: dict  # data/* once its prompts were drawn (logged with the step that trains on them)
    generate_s: tuple[float, float] = (0.0, 0.0)  # wall-clock start and end of its generation


@dataclass
class Redraw:
    """The prompts of a rollout that was in flight when the resumed checkpoint was taken, drawn again as they
    were: its `index` (sampling seed), the samplers' states before the draw, the jobs and data metrics."""

    index: int
    sampler_states: dict
    jobs: list
    data_metrics: dict


class Trainer:
    def __init__(self, recipe: Recipe, output: str | Path, roles: Callable[..., Roles] = start_roles):
        """Check the recipe's policy, load its domains, and start the run's processes with `roles` (mispo.loop.roles:
        `start_roles`, or in-process fakes in tests)."""
        self.recipe = recipe
        self.output = Path(output)
        self.metrics_log = MetricsLog(self.output, recipe.trainer.loggers, config=recipe.model_dump(mode="json"))
        self.checkpoints = CheckpointStore(self.output / "checkpoints")
        (self.output / "recipe.yaml").write_text(dump_recipe(recipe))
        r = recipe
        if r.resources.rollout_data_parallel > 1:
            from mispo.config import RecipeError
            raise RecipeError(f"resources.rollout_data_parallel = {r.resources.rollout_data_parallel}: the rollout "
                              "workers run vLLM's offline engine (vllm.LLM), which refuses data_parallel_size > 1, so "
                              "`mispo plan` can size this layout but `mispo train` cannot run it; fix: "
                              "rollout_data_parallel: 1 and more engines (rollout.num_workers = rollout_gpus / "
                              "rollout_tensor_parallel), with rollout_expert_parallel for MoE experts")
        self.domains = load_domains(r)  # before any model work: bad data or plugins fail fast
        self.samplers = {d.name: d.sampler() for d in self.domains}
        cores = run_split(r.resources, r.trainer.mode, r.rollout.num_workers)  # none when roles span nodes
        self.policy_path = str(starting_policy(r, self._warmup))
        # before the learners and engines start: what they cannot run, the engine's context, the tokenizer
        r.rollout.max_model_len = check_policy(self.policy_path, r)
        if r.algorithm.teachers:  # a teacher scores the policy's token ids: same tokenizer, before anything starts
            from mispo.weights.checkpoint_io import check_same_tokenizer
            from mispo.config import resolve_path
            check_same_tokenizer(self.policy_path, {name: resolve_path(r, path) for name, path in
                                                    r.algorithm.teachers.items()}, "algorithm.teachers", r.source)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        self.band = adaptive_band(r.algorithm)
        self.restarts = 0
        self.call_timeouts = CallTimeouts(r.trainer.call_timeout_s)  # learnt per kind of call, kept over restarts
        if r.trainer.ray_address:  # an existing cluster, maybe multi-node: every role's node must see the run
            start_ray(r.trainer.ray_address)
            check_shared_storage(r.resources, self.output, [Path(self.policy_path)])
        self.roles = roles(r, self.policy_path, cores, self.call_timeouts, max(d.max_new_tokens for d in self.domains))
        self.policy, self.critic, self.engines = self.roles.policy, self.roles.critic, self.roles.engines
        self.teachers = self.roles.teachers  # {domain: teacher group}: on-policy distillation's advantage source
        # pi_old is the update's own first forward when that is exact and nothing needs it beforehand
        # (one mini-batch, no reference, no adaptive band, no critic masks, no teachers, no dropout): one forward saved
        self.fused_old_logprobs = (r.learner.actor_mini_batches == 1 and not r.learner.reference
                                   and not self.teachers
                                   and self.band is None and not (self.critic and r.algorithm.critic_masks)
                                   and self.version_source is None
                                   and not self.policy.first(PolicyWorker.has_dropout))
        self.probe = SyncProbe(self.policy, self.engines, family_of(Path(self.policy_path)).name, r.model.dtype,
                               r.rollout.dtype or r.model.dtype, len(self.tokenizer), r.trainer.sync_check_every)
        # Rollouts run in background threads; Ray runs each worker's calls in submission order, so a
        # weight sync submitted after a rollout is applied after it (that rollout trains one step stale).
        # openai_agent domains: the run's OpenAI-compatible endpoint on a loopback port, stopped in shutdown
        self.agent_server = serve_agents(self.domains, self.tokenizer, r.rollout.max_model_len)
        self.ahead = r.trainer.max_staleness if r.trainer.mode == "async" else 0
        self.pool = ThreadPoolExecutor(max_workers=self.ahead + 1, thread_name_prefix="rollout")
        self.step = 0  # optimizer steps taken = the learner's policy version
        self.rollouts_started = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint (resumed or written)
        self.redrawn: deque[Redraw] = deque()  # the rollouts in flight at the resumed checkpoint
        self._last_generate_end = None

    def restart_learners(self, exc: BaseException) -> None:
        """A learner rank died (`exc`, Ray's error): start both learner groups again, load the last complete
        checkpoint into them and re-sync the engines, as `--resume` would, so the run goes on and ends where an
        uninterrupted one would (rollouts in flight are drawn again). Re-raises past trainer.max_restarts, with
        no checkpoint, or for a process that is not a learner."""
        from mispo.loop.dead_actor import role_of, what_died

        role = role_of(exc)
        if role not in ("PolicyWorker", "CriticWorker") or self.restarts >= self.recipe.trainer.max_restarts \
                or self.checkpoints.latest() is None:
            raise exc
        self.restarts, start = self.restarts + 1, time.time()
        console.print(f"[yellow]step {self.step + 1}: {what_died(exc)}; restarting the learners from the last "
                      f"checkpoint (restart {self.restarts} of trainer.max_restarts = "
                      f"{self.recipe.trainer.max_restarts})[/yellow]")
        for group in (self.policy, self.critic):
            if group is not None:
                group.kill()
        self.policy, self.critic = self.roles.policy, self.roles.critic = self.roles.start_learners()
        self.probe.policy = self.policy
        self.in_flight.clear()  # their prompts are drawn again from the checkpoint's sampler states
        self.redrawn.clear()
        self._maybe_resume()
        if self.keeps_versions:  # the new rank 0 keeps the versions from here on
            self.policy.rank0(PolicyWorker.keep_version, self.step, self.ahead)
        console.print(f"[green]learners restarted in {time.time() - start:.0f} s (started, checkpoint loaded, "
                      "engines re-synced)[/green]")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        r = self.recipe
        self._maybe_resume()
        probed = self.probe.start()  # the engines serve the learner's weights before anything trains
        if self.keeps_versions:  # the weights of every version a trained sample may come from
            self.policy.rank0(PolicyWorker.keep_version, self.step, self.ahead)
        self.in_flight: deque[PendingRollout] = deque()
        progress = StepProgress(r.trainer.max_steps, start=self.step)
        last_eval = {}
        interrupted, empty_in_a_row, dropped_before, uninformative_in_a_row = False, 0, 0.0, 0
        previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            if self.step == 0 and r.trainer.eval_every > 0 and self.can_evaluate:
                last_eval = self.evaluate()
                self.metrics_log.log(0, last_eval)
            deadline = time.time() + 60 * r.trainer.time_limit_minutes if r.trainer.time_limit_minutes else None
            while self.step < r.trainer.max_steps:
                # the current step's rollouts and, in async mode, those of the next `ahead` steps
                while len(self.in_flight) <= self.ahead and self.step + len(self.in_flight) < r.trainer.max_steps:
                    self.in_flight.append(self.start_rollout())
                try:
                    t0 = time.time()
                    by_domain, metrics = self.finish_rollout(self.in_flight.popleft())
                    t = time.time()
                    metrics.update(self.score(by_domain))
                    if r.algorithm.dynamic_sampling is not None:
                        by_domain, filled = self.refill_groups(by_domain)
                        metrics.update(filled)
                        if not filled["dynamic_sampling/groups"]:  # no group with reward variance: draw again
                            uninformative_in_a_row += 1
                            dropped_before += metrics["rollout/dropped_stale"]
                            warning = no_variance_streak(uninformative_in_a_row,
                                                         r.algorithm.dynamic_sampling.max_refills)
                            console.print(f"[yellow]step {self.step + 1}: {warning}[/yellow]")
                            continue
                        uninformative_in_a_row = 0
                    metrics["time/reward_s"] = time.time() - t
                    if not any(samples for _, samples in by_domain):  # every sample too stale: draw again
                        empty_in_a_row += 1
                        dropped_before += metrics["rollout/dropped_stale"]
                        if empty_in_a_row > self.ahead + 1:
                            raise RuntimeError(f"{empty_in_a_row} rollouts in a row were all more than "
                                               f"trainer.max_staleness = {self.ahead} versions behind the learner: "
                                               "the rollout engines are not receiving weights")
                        continue
                    metrics["rollout/dropped_stale"] += dropped_before  # counted with the step that follows
                    empty_in_a_row = dropped_before = 0
                    metrics.update(self.train_step(by_domain))
                    if probed:  # the gap before training, logged with the first step
                        metrics["sync/probe_logprob_diff_start"], probed = probed["sync/probe_logprob_diff"], {}
                    self.step += 1
                    metrics["time/step_s"] = time.time() - t0
                    if r.trainer.eval_every and self.step % r.trainer.eval_every == 0 and self.can_evaluate:
                        last_eval = self.evaluate()
                        metrics.update(last_eval)
                    self.metrics_log.log(self.step, metrics)
                    progress.update(self.step, metrics)
                    if periodic_save(self.step, r.trainer.save_every):
                        self.save()
                except (ray.exceptions.RayActorError, CallTimedOut) as exc:  # a learner died or hung: restart, or stop
                    self.restart_learners(exc)
                    continue
                if deadline and time.time() > deadline:
                    console.print(f"[yellow]trainer.time_limit_minutes reached at step {self.step}[/yellow]")
                    break
            if final_save(self.step, self.saved_step):  # save_every 0 included: a run always leaves one
                self.save()
            self.policy.all(PolicyWorker.export, str(self.output / "final"))
            self.tokenizer.save_pretrained(self.output / "final")  # final/ loads on its own
        except KeyboardInterrupt:
            interrupted = True
            console.print(f"[yellow]interrupted at step {self.step}: the last complete checkpoint is kept; "
                          f"continue with --resume[/yellow]")
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            progress.close()
            self.metrics_log.close()
        if interrupted:
            raise KeyboardInterrupt
        return last_eval

    # ------------------------------------------------------------------ one step
    def start_rollout(self) -> PendingRollout:
        """Draw the next prompts of every domain (or take those of a rollout that was in flight when the
        resumed checkpoint was taken) and start generating them (in a background thread) with the weights
        the workers have when the engine reaches them."""
        if self.redrawn:
            again = self.redrawn.popleft()
            index, states, jobs, data_metrics = again.index, again.sampler_states, again.jobs, again.data_metrics
        else:
            index, (states, jobs, data_metrics) = self.rollouts_started, self._draw()
            self.rollouts_started += 1
        pending = PendingRollout(index, None, states, data_metrics)
        pending.future = self.pool.submit(self.run_rollout, jobs, pending)
        return pending

    def run_rollout(self, jobs: list[tuple], pending: PendingRollout) -> list[tuple]:
        """[(domain, requests)] -> [(domain, samples)], n = rollout.n_samples per request, seeded by the
        rollout's index."""
        start = time.time()
        out = self._sample(jobs, pending.index)
        pending.generate_s = (start, time.time())
        return out

    def _sample(self, jobs: list[tuple], index: int) -> list[tuple]:
        """The recipe's sampling of [(domain, requests)], seeded by the rollout index."""
        r = self.recipe
        return generate_step(self.engines, jobs, r.rollout.n_samples, r.rollout.temperature, r.rollout.top_p,
                             seed=step_seed(r.trainer.seed, index))

    def finish_rollout(self, pending: PendingRollout) -> tuple[list[tuple], dict]:
        """Wait for a rollout; drop its samples older than the staleness bound. Metrics: the time the
        learner waited for it, the time the engine stood idle before it (waiting for weights), staleness."""
        t = time.time()
        by_domain = pending.future.result()
        metrics = {"time/wait_rollout_s": time.time() - t,
                   "time/generate_s": pending.generate_s[1] - pending.generate_s[0]}
        if self._last_generate_end is not None:
            metrics["time/rollout_idle_s"] = max(0.0, pending.generate_s[0] - self._last_generate_end)
        self._last_generate_end = pending.generate_s[1]
        by_domain, staleness = drop_stale(by_domain, self.step, self.ahead)
        return by_domain, {**metrics, **staleness, **pending.data_metrics}

    def refill_groups(self, by_domain: list[tuple]) -> tuple[list[tuple], dict]:
        """Dynamic sampling: drop the groups without reward variance, generate and score more prompts
        now (with the engines' current weights) until the step is full or the refill cap is reached."""
        r = self.recipe

        def draw_more(count: int, first_group: int) -> list[tuple]:
            jobs = draw_step(self.domains, self.samplers, count, self.tokenizer, first_group)
            index, self.rollouts_started = self.rollouts_started, self.rollouts_started + 1
            more = self._sample(jobs, index)
            more, _ = drop_stale(more, self.step, self.ahead)
            self.score(more)
            return more

        by_domain, metrics = fill_batch(by_domain, r.rollout.prompts_per_step,
                                        r.algorithm.dynamic_sampling.max_refills, draw_more)
        if metrics["dynamic_sampling/cap_reached"]:
            console.print(f"[yellow]step {self.step + 1}: dynamic sampling kept {metrics['dynamic_sampling/groups']:.0f} "
                          f"of rollout.prompts_per_step = {r.rollout.prompts_per_step} groups after "
                          f"algorithm.dynamic_sampling.max_refills = {r.algorithm.dynamic_sampling.max_refills} refills "
                          f"({metrics['dynamic_sampling/dropped_groups']:.0f} groups had one reward for all samples)"
                          "[/yellow]")
        return by_domain, metrics

    def train_step(self, by_domain: list[tuple]) -> dict:
        """One update on the scored samples of each domain, by_domain = [(domain, samples)]: forward, advantages and masks, updates, sync.
        With `fused_old_logprobs` the policy's forward is skipped: the update computes pi_old and the masks."""
        r = self.recipe
        metrics: dict = {}
        samples = [s for _, domain_samples in by_domain for s in domain_samples]
        batch = RolloutBatch.from_samples(samples)

        t = time.time()
        batch_ref = self.policy.share(batch)
        logp_refs = [] if self.fused_old_logprobs else self.policy.submit(PolicyWorker.compute_logprobs, batch_ref)
        values_refs = self.critic.submit(CriticWorker.compute_values, batch_ref) if self.critic else []
        for group, method, refs in ((self.policy, PolicyWorker.compute_logprobs, logp_refs),
                                    (self.critic, CriticWorker.compute_values, values_refs)):
            for k, v in (merge_row_results(group.wait(refs, method)) if refs else {}).items():  # rows per rank
                setattr(batch, k, v)
        metrics["time/forward_s"] = time.time() - t
        if r.trainer.mismatch_attribution:
            t = time.time()
            metrics.update(self.policy.rank0(PolicyWorker.attribute_mismatch, batch_ref, self.step))
            metrics["time/attribution_s"] = time.time() - t

        if self.version_source is not None:
            t = time.time()
            metrics.update(self.score_at_sampling_versions(batch))
            metrics["time/version_logprobs_s"] = time.time() - t
        if self.teachers:
            t = time.time()
            metrics.update(self.score_with_teachers(batch, by_domain))
            metrics["time/teacher_s"] = time.time() - t

        metrics.update(prepare_update(batch, r.algorithm, self.band))
        if self.ahead:
            metrics.update(lag_diagnostics(batch, self.step, r.algorithm))

        t = time.time()
        batch_ref = self.policy.share(batch)
        actor_refs = self.policy.submit(PolicyWorker.train, batch_ref)
        critic_refs = self.critic.submit(CriticWorker.train, batch_ref) if self.critic else []
        metrics.update(combine_partials(self.policy.wait(actor_refs, PolicyWorker.train)))  # ranks' shares
        if critic_refs:
            metrics.update(combine_partials(self.critic.wait(critic_refs, CriticWorker.train)))
        metrics["time/train_s"] = time.time() - t
        if r.model.router_bias_update_rate > 0:
            self.policy.all(PolicyWorker.update_router_bias, r.model.router_bias_update_rate)
        metrics.update(self.policy.first(PolicyWorker.routing_stats))

        t = time.time()
        self.sync_weights(version=self.step + 1)
        metrics["time/weight_sync_s"] = time.time() - t
        metrics.update(self.probe.after_sync(self.step + 1))
        warning = fp32_sync_warning(metrics, r.trainer.mode, self.probe.dtypes)
        if warning:
            console.print(f"[yellow]step {self.step + 1}: {warning}[/yellow]")
        if self.keeps_versions:
            self.policy.rank0(PolicyWorker.keep_version, self.step + 1, self.ahead)
        n_tokens = float(batch.response_mask.sum())
        metrics.update({
            "rollout/response_len": n_tokens / len(samples),
            "rollout/truncated_frac": float(batch.truncated.float().mean()),
            "throughput/tokens": n_tokens,
        })
        return metrics

    @property
    def version_source(self) -> str | None:
        """Where pi_v comes from (mispo_decoupled in async mode): "kept_versions", "rollout", or None."""
        return self.recipe.version_logprobs_source()

    @property
    def keeps_versions(self) -> bool:
        """Whether learner rank 0 keeps CPU copies of the versions in flight (pi_v, or mismatch attribution)."""
        return self.recipe.trainer.mismatch_attribution or self.version_source == "kept_versions"

    def score_at_sampling_versions(self, batch: RolloutBatch) -> dict:
        """Set batch.version_logprobs, log pi_v of each token under the weights that sampled it: scored on learner
        rank 0's kept copies, or the engine's log-prob for stale tokens (algorithm.version_logprobs: rollout)."""
        if self.version_source == "kept_versions":
            out = self.policy.rank0(PolicyWorker.version_logprobs, self.policy.share(batch), self.step)  # with pi_old filled in
            batch.version_logprobs = out.pop("version_logprobs")
            return out
        batch.version_logprobs, unscored = logprobs_at_versions(batch, self.step, (), None)
        return {"lag/unscored_tokens": float(unscored)}

    def score_with_teachers(self, batch: RolloutBatch, by_domain: list[tuple]) -> dict:
        """Set batch.teacher_logprobs: each domain's rows scored by its teacher (advantage reverse_kl; the rows
        of batch are by_domain's samples in order). Logs distill/reverse_kl = mean over model tokens of
        log pi_old - log pi_teacher, and distill/<domain>/reverse_kl when there are several domains."""
        from mispo.learner.teacher_worker import TeacherWorker

        teacher, metrics, row = torch.zeros_like(batch.old_logprobs), {}, 0
        for domain, samples in by_domain:
            if not samples:
                continue
            rows = list(range(row, row + len(samples)))
            part = batch.select(rows)
            group = self.teachers[domain.name]
            scored = sum(group.all(TeacherWorker.compute_logprobs, group.share(part)))  # ranks' rows, zeros elsewhere
            teacher[rows, : scored.shape[1]] = scored
            if len(by_domain) > 1:
                metrics[f"distill/{domain.name}/reverse_kl"] = reverse_kl(part.old_logprobs, scored,
                                                                          part.response_mask)
            row += len(samples)
        batch.teacher_logprobs = teacher
        metrics["distill/reverse_kl"] = reverse_kl(batch.old_logprobs, teacher, batch.response_mask)
        return metrics

    def score(self, by_domain: list[tuple]) -> dict:
        """Reward every sample; one domain logs `reward/*` as it is, several add `reward/<domain>/*`
        and the overall `reward/mean`."""
        if len(by_domain) == 1:
            domain, samples = by_domain[0]
            return domain.score(samples)
        metrics = {}
        for domain, samples in by_domain:
            for k, v in domain.score(samples).items():
                metrics[k.replace("reward/", f"reward/{domain.name}/", 1)] = v
        every = [s.reward for _, samples in by_domain for s in samples]
        if every:
            metrics["reward/mean"] = sum(every) / len(every)
        return metrics

    def _draw(self) -> tuple[dict, list[tuple], dict]:
        """One rollout's prompts: (the samplers' states before the draw, [(domain, requests)], data/* after)."""
        states = self._sampler_states()
        jobs = draw_step(self.domains, self.samplers, self.recipe.rollout.prompts_per_step, self.tokenizer)
        return states, jobs, self._sampler_metrics()

    def _sampler_states(self) -> dict:
        return {name: s.state_dict() for name, s in self.samplers.items()}

    def _load_samplers(self, states: dict, folder: Path) -> None:
        for name, sampler_state in states.items():
            if name not in self.samplers:
                raise ValueError(f"the checkpoint in {folder} has prompts of domain {name!r}, which this recipe "
                                 f"lacks (it has {', '.join(self.samplers)}); fix: resume with the same recipe")
            self.samplers[name].load_state_dict(sampler_state)

    def _sampler_metrics(self) -> dict:
        """data/* of the one sampler, or summed over domains (data/epoch: the least advanced domain)."""
        parts = [s.metrics() for s in self.samplers.values()]
        if len(parts) == 1:
            return parts[0]
        return {"data/samples_seen": sum(p["data/samples_seen"] for p in parts),
                "data/epoch": min(p["data/epoch"] for p in parts)}

    def sync_weights(self, version: int) -> None:
        """The policy's weights into the rollout engines (`resources.weight_sync`): through the object store,
        or broadcast by learner rank 0 (every learner rank takes part: ZeRO-3 gathers)."""
        from mispo.weights.broadcast import sync_backend

        backend = sync_backend(self.recipe.resources)
        if backend is None:
            self.engines.sync(self.policy.first(PolicyWorker.weight_bucket_refs), version)
        else:
            send = lambda group: self.policy.submit(PolicyWorker.broadcast_weights, group)  # noqa: E731
            self.engines.sync_broadcast(send, version, backend)

    # ------------------------------------------------------------------ evaluation
    @property
    def can_evaluate(self) -> bool:
        return all(d.eval_rows for d in self.domains)

    def evaluate(self) -> dict:
        """Greedy decoding on each domain's held-out rows; eval/accuracy = mean reward (1.0 = correct),
        averaged over domains, with eval/accuracy/<domain> when there are several."""
        per_domain = {d.name: d.evaluate(self.engines, self.tokenizer) for d in self.domains}
        out = {"eval/accuracy": sum(per_domain.values()) / len(per_domain),
               "eval/n": float(sum(len(d.eval_rows) for d in self.domains))}
        if len(per_domain) > 1:
            out.update({f"eval/accuracy/{name}": acc for name, acc in per_domain.items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Checkpoint after step `self.step`. Rollouts in flight are not saved: the checkpoint keeps, for
        each, its index and the samplers' states before its prompts were drawn, and the resumed run draws
        those prompts again, generates them with the same seeds, then continues from the samplers' current
        states (which include prompts drawn since, e.g. by dynamic sampling's refills)."""
        staging = self.checkpoints.staging(self.step)
        critic_refs = self.critic.submit(CriticWorker.save, str(staging / "critic"), "state") if self.critic else []
        try:
            self.policy.wait(self.policy.submit(PolicyWorker.save, str(staging / "policy"), "state"),
                             PolicyWorker.save)
            if critic_refs:
                self.critic.wait(critic_refs, CriticWorker.save)
        except ray.exceptions.RayTaskError as exc:  # a learner's write failed (a full disk): keep the last one
            self.checkpoints.discard(staging)
            cause = getattr(exc, "cause", None)  # the learner's own exception
            if not isinstance(cause, OSError):
                raise
            previous = self.checkpoints.latest()
            raise write_failure(self.checkpoints.folder, self.step, cause,
                                previous[0].name if previous else None) from None
        in_flight = [{"index": p.index, "samplers": p.sampler_states} for p in self.in_flight] + \
                    [{"index": again.index, "samplers": again.sampler_states} for again in self.redrawn]
        state = {"step": self.step, "samplers": self._sampler_states(), "in_flight": in_flight,
                 "rollouts_started": self.rollouts_started,
                 "band": self.band.state_dict() if self.band else None,
                 "python_random": list(random.getstate()[1]), "torch_random": torch.get_rng_state().tolist()}
        self.checkpoints.commit(staging, self.step, state, keep=self.recipe.trainer.keep_checkpoints)
        self.saved_step = self.step

    def _maybe_resume(self) -> None:
        found = self.checkpoints.latest()
        if found is None:
            return
        folder, state = found
        critic_refs = self.critic.submit(CriticWorker.load, str(folder / "critic"), "state") if self.critic else []
        self.policy.wait(self.policy.submit(PolicyWorker.load, str(folder / "policy"), "state"), PolicyWorker.load)
        if critic_refs:
            self.critic.wait(critic_refs, CriticWorker.load)
        self.step = self.saved_step = state["step"]
        self.rollouts_started = state.get("rollouts_started", self.step)
        for pending in state.get("in_flight", []):  # their prompts again, as they were drawn
            self._load_samplers(pending["samplers"], folder)
            self.redrawn.append(Redraw(pending["index"], *self._draw()))
        self._load_samplers(state["samplers"], folder)
        if self.band and state.get("band"):
            self.band.load_state_dict(state["band"])
        random.setstate((3, tuple(state["python_random"]), None))
        torch.set_rng_state(torch.tensor(state["torch_random"], dtype=torch.uint8))
        self.metrics_log.truncate(self.step)
        self.sync_weights(version=self.step)
        console.print(f"[green]resumed from {folder} at step {self.step}[/green]")

    def _warmup(self, base: Path, out: Path) -> None:
        from mispo.sft import run_warmup
        start_ray(self.recipe.trainer.ray_address)  # the warm-up's learners run in Ray
        run_warmup(self.recipe, base, out)

    def shutdown(self) -> None:
        """Stop the rollout workers and learners (the Ray cluster stays up for the next job)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.roles.shutdown()
        for d in self.domains:
            d.close()
        if self.agent_server is not None:
            self.agent_server.stop()
