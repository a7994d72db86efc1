"""The MIS-PO training loop, readable top to bottom.

One step:  prompts -> rollout workers (vLLM) -> rewards -> pi_old log-probs and values (learners)
           -> advantages -> MIS-PO masks -> actor and critic updates -> weight sync -> log, checkpoint.
Rollout workers and learners are Ray actors; this driver only moves batches between them.
In async mode the next rollouts are generated while the current batch trains, at most
`trainer.max_staleness` optimizer steps behind the learner; MIS-PO's filters keep them safe.
"""

from __future__ import annotations

import random
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from rich.console import Console

from mispo.algorithms import AdaptiveTrajBand, compute_gae, group_advantages, mis_filter, whiten_advantages
from mispo.batch import RolloutBatch
from mispo.cluster import start_ray
from mispo.config import Recipe, dump_recipe
from mispo.domains import load_domains, split_prompts
from mispo.learner.critic_worker import CriticWorker
from mispo.learner.data_parallel import merge_row_results
from mispo.learner.group import LearnerGroup
from mispo.learner.metrics import combine_partials
from mispo.learner.policy_worker import PolicyWorker
from mispo.placement import learner_options, place_roles
from mispo.prepare_model import starting_policy
from mispo.progress import StepProgress
from mispo.rollout.group import RolloutGroup
from mispo.run_dir import RunDir

console = Console(stderr=True)


class Trainer:
    def __init__(self, recipe: Recipe, output: str | Path):
        self.recipe = recipe
        self.run = RunDir(output)
        (self.run.path / "recipe.yaml").write_text(dump_recipe(recipe))
        r = recipe
        start_ray(r.trainer.ray_address)
        self.domains = load_domains(r)  # before any model work: bad data or plugins fail fast
        self.samplers = {d.name: d.sampler() for d in self.domains}
        self.policy_path = str(starting_policy(r, self._warmup))
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        self.band = AdaptiveTrajBand(target_keep=r.algorithm.adaptive_target_keep,
                                     base_bounds=tuple(r.algorithm.traj_bounds)) \
            if r.algorithm.adaptive_traj_band else None
        common = dict(model=r.model.model_dump(), learner=r.learner.model_dump(),
                      algorithm=r.algorithm.model_dump(), seed=r.trainer.seed)
        with_critic = r.learner.critic is not None and r.algorithm.advantage == "gae"
        self.placement = place_roles(r.resources, with_critic, r.rollout.num_workers)  # None on a CPU run
        actor_opts, critic_opts = learner_options(self.placement, with_critic)
        ranks = r.learner.ranks  # CPU runs; a GPU run has one rank per placed GPU
        self.policy = LearnerGroup(PolicyWorker, actor_opts, self.policy_path, cpu_ranks=ranks,
                                   max_new_tokens=max(d.max_new_tokens for d in self.domains), **common)
        self.critic = LearnerGroup(CriticWorker, critic_opts, self.policy_path, cpu_ranks=ranks,
                                   **common) if with_critic else None
        self.rollout = RolloutGroup(self.policy_path, r.rollout, dtype=r.model.dtype, seed=r.trainer.seed,
                                    options=self.placement.rollout.options if self.placement else None)
        # Rollouts run in background threads; Ray runs each worker's calls in submission order, so a
        # weight sync submitted after a rollout is applied after it (that rollout is one step stale).
        self.pool = ThreadPoolExecutor(max_workers=max(1, r.trainer.max_staleness), thread_name_prefix="rollout")
        self.step = 0

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        r = self.recipe
        self._maybe_resume()
        in_flight: deque = deque()
        progress = StepProgress(r.trainer.max_steps, start=self.step)
        last_eval = {}
        interrupted = False
        previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            if self.step == 0 and r.trainer.eval_every > 0 and self.can_evaluate:
                last_eval = self.evaluate()
                self.run.log(0, last_eval)
            deadline = time.time() + 60 * r.trainer.time_limit_minutes if r.trainer.time_limit_minutes else None
            while self.step < r.trainer.max_steps:
                depth = r.trainer.max_staleness if r.trainer.mode == "async" else 1
                while len(in_flight) < depth and self.step + len(in_flight) < r.trainer.max_steps:
                    in_flight.append(self.start_rollout())
                t0 = time.time()
                samples = self.finish_rollout(in_flight.popleft())
                metrics = self.train_step(samples)
                self.step += 1
                metrics["time/step_s"] = time.time() - t0
                if r.trainer.eval_every and self.step % r.trainer.eval_every == 0 and self.can_evaluate:
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                self.run.log(self.step, metrics)
                progress.update(self.step, metrics)
                if r.trainer.save_every and self.step % r.trainer.save_every == 0:
                    self.save()
                if deadline and time.time() > deadline:
                    console.print(f"[yellow]trainer.time_limit_minutes reached at step {self.step}[/yellow]")
                    break
            if self.step % max(r.trainer.save_every, 1):
                self.save()
            self.policy.all("export", str(self.run.path / "final"))
            self.tokenizer.save_pretrained(self.run.path / "final")  # final/ loads on its own
        except KeyboardInterrupt:
            interrupted = True
            console.print(f"[yellow]interrupted at step {self.step}: the last complete checkpoint is kept; "
                          f"continue with --resume[/yellow]")
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            progress.close()
            self.run.close()
        if interrupted:
            raise KeyboardInterrupt
        return last_eval

    # ------------------------------------------------------------------ one step
    def start_rollout(self) -> Future:
        """Draw the next prompts of every domain and start generating them with the weights the
        workers have now."""
        r = self.recipe
        counts = split_prompts(r.rollout.prompts_per_step, [d.weight for d in self.domains])
        jobs, first_group = [], 0
        for domain, count in zip(self.domains, counts):
            rows = [domain.train_rows[i] for i in self.samplers[domain.name].next_batch(count)]
            jobs.append((domain, domain.requests(rows, self.tokenizer, first_group)))
            first_group += count
        return self.pool.submit(self.generate, jobs)

    def finish_rollout(self, pending: Future) -> list[tuple]:
        return pending.result()

    def generate(self, jobs: list[tuple]) -> list[tuple]:
        """[(domain, requests)] -> [(domain, samples)], n = rollout.n_samples per request."""
        r = self.recipe.rollout
        return [(d, d.generate(self.rollout, requests, r.n_samples, r.temperature, r.top_p)) for d, requests in jobs]

    def train_step(self, rollouts: list[tuple]) -> dict:
        r, a = self.recipe, self.recipe.algorithm
        metrics: dict = {}
        t = time.time()
        metrics.update(self.score(rollouts))
        metrics["time/reward_s"] = time.time() - t
        samples = [s for _, domain_samples in rollouts for s in domain_samples]
        batch = RolloutBatch.from_samples(samples)

        t = time.time()
        batch_ref = ray.put(batch)
        logp_refs = self.policy.submit("compute_logprobs", batch_ref)
        values_refs = self.critic.submit("compute_values", batch_ref) if self.critic else []
        for refs in (logp_refs, values_refs):  # each rank fills its own rows
            for k, v in (merge_row_results(ray.get(refs)) if refs else {}).items():
                setattr(batch, k, v)
        metrics["time/forward_s"] = time.time() - t

        mask = batch.response_mask
        if a.advantage == "gae":
            truncated = batch.truncated if a.bootstrap_truncated else None
            batch.advantages, batch.returns = compute_gae(batch.rewards, batch.values, mask, a.gamma, a.lam,
                                                          truncated=truncated, bootstrap_value=batch.bootstrap_values)
        else:
            seq_adv = group_advantages(batch.rewards, group_ids=batch.group_ids, method=a.advantage)
            batch.advantages = seq_adv[:, None] * mask
        if a.whiten_advantages:
            batch.advantages = whiten_advantages(batch.advantages, mask)

        traj_bounds = tuple(a.traj_bounds)
        if self.band is not None:
            traj_bounds = self.band.update(batch.old_logprobs, batch.rollout_logprobs, mask)
            metrics.update(self.band.metrics())
        batch.token_keep, batch.traj_keep = mis_filter(batch.old_logprobs, batch.rollout_logprobs, mask,
                                                       tuple(a.token_bounds), traj_bounds)

        t = time.time()
        batch_ref = ray.put(batch)
        actor_refs = self.policy.submit("train", batch_ref)
        critic_refs = self.critic.submit("train", batch_ref) if self.critic else []
        metrics.update(combine_partials(ray.get(actor_refs)))  # ranks hold shares of each loss
        if critic_refs:
            metrics.update(combine_partials(ray.get(critic_refs)))
        metrics["time/train_s"] = time.time() - t
        if r.model.router_bias_update_rate > 0:
            self.policy.all("update_router_bias", r.model.router_bias_update_rate)
        metrics.update(self.policy.first("routing_stats"))

        t = time.time()
        self.sync_weights(version=self.step + 1)
        metrics["time/weight_sync_s"] = time.time() - t
        n_tokens = float(mask.sum())
        metrics.update({
            "rollout/response_len": n_tokens / len(samples),
            "rollout/truncated_frac": float(batch.truncated.float().mean()),
            "rollout/staleness": float(self.step - min(s.version for s in samples)),
            "throughput/tokens": n_tokens,
            **self._sampler_metrics(),
        })
        return metrics

    def score(self, rollouts: list[tuple]) -> dict:
        """Reward every sample; one domain logs `reward/*` as it is, several add `reward/<domain>/*`
        and the overall `reward/mean`."""
        if len(rollouts) == 1:
            domain, samples = rollouts[0]
            return domain.score(samples)
        metrics = {}
        for domain, samples in rollouts:
            for k, v in domain.score(samples).items():
                metrics[k.replace("reward/", f"reward/{domain.name}/", 1)] = v
        every = [s.reward for _, samples in rollouts for s in samples]
        metrics["reward/mean"] = sum(every) / len(every)
        return metrics

    def _sampler_metrics(self) -> dict:
        """data/* of the one sampler, or summed over domains (data/epoch: the least advanced domain)."""
        parts = [s.metrics() for s in self.samplers.values()]
        if len(parts) == 1:
            return parts[0]
        return {"data/samples_seen": sum(p["data/samples_seen"] for p in parts),
                "data/epoch": min(p["data/epoch"] for p in parts)}

    def sync_weights(self, version: int) -> None:
        self.rollout.sync(self.policy.first("weight_bucket_refs"), version)

    # ------------------------------------------------------------------ evaluation
    @property
    def can_evaluate(self) -> bool:
        return all(d.eval_rows for d in self.domains)

    def evaluate(self) -> dict:
        """Greedy decoding on each domain's held-out rows; eval/accuracy = mean reward (1.0 = correct),
        averaged over domains, with eval/accuracy/<domain> when there are several."""
        per_domain = {d.name: d.evaluate(self.rollout, self.tokenizer) for d in self.domains}
        out = {"eval/accuracy": sum(per_domain.values()) / len(per_domain),
               "eval/n": float(sum(len(d.eval_rows) for d in self.domains))}
        if len(per_domain) > 1:
            out.update({f"eval/accuracy/{name}": acc for name, acc in per_domain.items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        staging = self.run.staging(self.step)
        refs = self.policy.submit("save", str(staging / "policy"), "state")
        if self.critic:
            refs += self.critic.submit("save", str(staging / "critic"), "state")
        ray.get(refs)
        state = {"step": self.step, "samplers": {name: s.state_dict() for name, s in self.samplers.items()},
                 "band": self.band.state_dict() if self.band else None,
                 "python_random": list(random.getstate()[1]), "torch_random": torch.get_rng_state().tolist()}
        self.run.commit(staging, self.step, state, keep=self.recipe.trainer.keep_checkpoints)

    def _maybe_resume(self) -> None:
        found = self.run.latest()
        if found is None:
            return
        folder, state = found
        refs = self.policy.submit("load", str(folder / "policy"), "state")
        if self.critic:
            refs += self.critic.submit("load", str(folder / "critic"), "state")
        ray.get(refs)
        self.step = state["step"]
        for name, sampler_state in state["samplers"].items():
            if name not in self.samplers:
                raise ValueError(f"the checkpoint in {folder} has prompts of domain {name!r}, which this recipe "
                                 f"lacks (it has {', '.join(self.samplers)}); fix: resume with the same recipe")
            self.samplers[name].load_state_dict(sampler_state)
        if self.band and state.get("band"):
            self.band.load_state_dict(state["band"])
        random.setstate((3, tuple(state["python_random"]), None))
        torch.set_rng_state(torch.tensor(state["torch_random"], dtype=torch.uint8))
        self.run.truncate_metrics(self.step)
        self.sync_weights(version=self.step)
        console.print(f"[green]resumed from {folder} at step {self.step}[/green]")

    def _warmup(self, base: Path, out: Path) -> None:
        from mispo.sft import run_warmup
        run_warmup(self.recipe, base, out)

    def shutdown(self) -> None:
        """Stop the rollout workers and learners (the Ray cluster stays up for the next job)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rollout.shutdown()
        for group in (self.policy, self.critic):
            if group is not None:
                group.kill()
        if self.placement is not None:
            self.placement.remove()
        for d in self.domains:
            d.close()
