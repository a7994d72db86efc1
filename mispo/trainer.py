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
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from rich.console import Console

from mispo.algorithms import AdaptiveTrajBand, compute_gae, group_advantages, mis_filter, whiten_advantages
from mispo.batch import RolloutBatch, Sample
from mispo.config import Recipe, dump_recipe
from mispo.data import PromptSampler, load_rows, render_prompt
from mispo.learner.critic_worker import CriticWorker
from mispo.learner.policy_worker import PolicyWorker
from mispo.plugins import load_reward
from mispo.prepare_model import starting_policy
from mispo.progress import StepProgress
from mispo.reward_runner import RewardRunner
from mispo.rollout.group import RolloutGroup
from mispo.run_dir import RunDir

console = Console(stderr=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    def __init__(self, recipe: Recipe, output: str | Path):
        self.recipe = recipe
        self.run = RunDir(output)
        (self.run.path / "recipe.yaml").write_text(dump_recipe(recipe))
        r = recipe
        if not ray.is_initialized():
            ray.init(address=r.trainer.ray_address, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not torch.cuda.is_available() else None)
        self.policy_path = str(starting_policy(r, self._warmup))
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        self.train_rows = load_rows(r.data.train, r.source, "train", r.data)
        self.eval_rows = load_rows(r.data.eval, r.source, "eval", r.data) if r.data.eval else []
        self.sampler = PromptSampler(len(self.train_rows), seed=r.data.seed)
        plugins = [{k: v for k, v in p.model_dump(exclude_none=True).items() if v != {}} for p in r.reward.plugins]
        self.reward = RewardRunner(load_reward(plugins,
                                               field="reward.plugins", source=r.source),
                                   timeout_s=r.reward.timeout, failure_score=r.reward.failure_score,
                                   max_concurrency=r.reward.max_concurrency)
        self.band = AdaptiveTrajBand(target_keep=r.algorithm.adaptive_target_keep,
                                     base_bounds=tuple(r.algorithm.traj_bounds)) \
            if r.algorithm.adaptive_traj_band else None
        common = dict(model=r.model.model_dump(), learner=r.learner.model_dump(),
                      algorithm=r.algorithm.model_dump(), seed=r.trainer.seed)
        self.policy = ray.remote(num_cpus=0)(PolicyWorker).remote(
            self.policy_path, max_new_tokens=r.rollout.max_new_tokens, master_port=free_port(), **common)
        self.critic = None
        if r.learner.critic is not None and r.algorithm.advantage == "gae":
            self.critic = ray.remote(num_cpus=0)(CriticWorker).remote(self.policy_path, master_port=free_port(),
                                                                     **common)
        self.rollout = RolloutGroup(self.policy_path, r.rollout, dtype=r.model.dtype, seed=r.trainer.seed)
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
            if self.step == 0 and r.trainer.eval_every > 0 and self.eval_rows:
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
                if r.trainer.eval_every and self.step % r.trainer.eval_every == 0 and self.eval_rows:
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
            ray.get(self.policy.export.remote(str(self.run.path / "final")))
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
        """Draw the next prompts and start generating them with the weights the workers have now."""
        r = self.recipe
        rows = [self.train_rows[i] for i in self.sampler.next_batch(r.rollout.prompts_per_step)]
        return self.pool.submit(self.generate, self._requests(rows), r.rollout.n_samples, r.rollout.temperature)

    def finish_rollout(self, pending: Future) -> list[Sample]:
        return pending.result()

    def generate(self, requests: list[dict], n: int, temperature: float) -> list[Sample]:
        r = self.recipe.rollout
        top_p = r.top_p if temperature > 0 else 1.0
        if r.environment:
            return self.rollout.generate_episodes(requests, r.environment, n=n, temperature=temperature, top_p=top_p,
                                                  max_new_tokens=r.max_new_tokens, max_turns=r.max_turns)
        return self.rollout.generate(requests, n=n, temperature=temperature, top_p=top_p,
                                     max_new_tokens=r.max_new_tokens)

    def train_step(self, samples: list[Sample]) -> dict:
        r, a = self.recipe, self.recipe.algorithm
        metrics: dict = {}
        t = time.time()
        if not r.rollout.environment:  # environments score their own episodes
            metrics.update(self.score(samples))
        else:
            metrics["reward/mean"] = sum(s.reward for s in samples) / len(samples)
        metrics["time/reward_s"] = time.time() - t
        batch = RolloutBatch.from_samples(samples)

        t = time.time()
        logp_ref = self.policy.compute_logprobs.remote(batch)
        values_ref = self.critic.compute_values.remote(batch) if self.critic else None
        for k, v in ray.get(logp_ref).items():
            setattr(batch, k, v)
        if values_ref is not None:
            for k, v in ray.get(values_ref).items():
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
        actor_ref = self.policy.train.remote(batch)
        critic_ref = self.critic.train.remote(batch) if self.critic else None
        metrics.update(ray.get(actor_ref))
        if critic_ref is not None:
            metrics.update(ray.get(critic_ref))
        metrics["time/train_s"] = time.time() - t
        if r.model.router_bias_update_rate > 0:
            ray.get(self.policy.update_router_bias.remote(r.model.router_bias_update_rate))
        metrics.update(ray.get(self.policy.routing_stats.remote()))

        t = time.time()
        self.sync_weights(version=self.step + 1)
        metrics["time/weight_sync_s"] = time.time() - t
        n_tokens = float(mask.sum())
        metrics.update({
            "rollout/response_len": n_tokens / len(samples),
            "rollout/truncated_frac": float(batch.truncated.float().mean()),
            "rollout/staleness": float(self.step - min(s.version for s in samples)),
            "throughput/tokens": n_tokens,
            **self.sampler.metrics(),
        })
        return metrics

    def score(self, samples: list[Sample]) -> dict:
        batch = [{**s.row, "prompt": s.row.get("prompt", s.prompt_text), "completion": s.response_text}
                 for s in samples]
        result = self.reward.score(batch)
        for s, score, extra in zip(samples, result.scores, result.extras):
            s.reward, s.reward_info = float(score), extra
        return dict(result.metrics)

    def sync_weights(self, version: int) -> None:
        self.rollout.sync(ray.get(self.policy.weight_bucket_refs.remote()), version)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Greedy decoding on the held-out rows; eval/accuracy = mean reward (1.0 = correct)."""
        samples = self.generate(self._requests(self.eval_rows), n=1, temperature=0.0)
        if self.recipe.rollout.environment:
            scores = [s.reward for s in samples]
        else:
            scores = self.reward.score([{**s.row, "completion": s.response_text} for s in samples]).scores
        return {"eval/accuracy": sum(scores) / len(scores), "eval/n": float(len(scores))}

    def _requests(self, rows: list[dict]) -> list[dict]:
        out = []
        for i, row in enumerate(rows):
            text, ids = render_prompt(row, self.tokenizer, self.recipe.data)
            out.append({"prompt_ids": ids, "prompt_text": text, "row": row, "group": i})
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        staging = self.run.staging(self.step)
        refs = [self.policy.save.remote(str(staging / "policy"), "state")]
        if self.critic:
            refs.append(self.critic.save.remote(str(staging / "critic"), "state"))
        ray.get(refs)
        state = {"step": self.step, "sampler": self.sampler.state_dict(),
                 "band": self.band.state_dict() if self.band else None,
                 "python_random": list(random.getstate()[1]), "torch_random": torch.get_rng_state().tolist()}
        self.run.commit(staging, self.step, state, keep=self.recipe.trainer.keep_checkpoints)

    def _maybe_resume(self) -> None:
        found = self.run.latest()
        if found is None:
            return
        folder, state = found
        refs = [self.policy.load.remote(str(folder / "policy"), "state")]
        if self.critic:
            refs.append(self.critic.load.remote(str(folder / "critic"), "state"))
        ray.get(refs)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        if self.band and state.get("band"):
            self.band.load_state_dict(state["band"])
        random.setstate((3, tuple(state["python_random"]), None))
        torch.set_rng_state(torch.tensor(state["torch_random"], dtype=torch.uint8))
        self.run.truncate_metrics(self.step)
        self.sync_weights(version=self.step)
        console.print(f"[green]resumed from {folder} at step {self.step}[/green]")

    def _warmup(self, base: Path, out: Path) -> None:
        from mispo.warmup import run_warmup
        run_warmup(self.recipe, base, out, free_port())

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rollout.shutdown()
        self.reward.close()
