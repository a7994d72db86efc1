"""Domains: a set of prompts, how answers to them are scored, and their share of each step.

A single-domain recipe (its own `data`, `reward`, `rollout.environment`) is one domain named after
the recipe. A multi-domain recipe lists single-domain recipe files:

    domains:
      math: {recipe: math_expert.yaml, weight: 1}
      tool: {recipe: tool_expert.yaml, weight: 1}

and each step draws `rollout.prompts_per_step` prompts split over the domains by weight. A domain
scores its answers with its reward plugins (single turn) or lets its environment play and score
multi-turn episodes (an `openai_agent` environment is an agent function played against the run's
OpenAI-compatible endpoint, `agent_server`: mispo.rollout.agent_episodes); `max_new_tokens` and
`max_turns` are the domain recipe's.

    domains = load_domains(recipe)                          # rows loaded, rewards checked
    samples = domains[0].sample(rollout_group, requests, n=8, temperature=1.0)
    metrics = domains[0].score(samples)                     # sets Sample.reward
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mispo.batch import Sample
from mispo.config import SHARED_SAMPLING_KEYS, Recipe, RecipeError, RolloutConfig, load_recipe, resolve_path
from mispo.data import PromptSampler, load_rows, render_prompt


@dataclass
class Domain:
    """One domain; `recipe` is the single-domain recipe that defines it."""

    name: str
    recipe: Recipe
    weight: float = 1.0
    train_rows: list[dict] = field(default_factory=list, repr=False)
    eval_rows: list[dict] = field(default_factory=list, repr=False)
    reward: object | None = field(default=None, repr=False)  # RewardRunner; None with an environment
    agent: object | None = field(default=None, repr=False)  # environment_kind openai_agent: the agent function
    agent_server: object | None = field(default=None, repr=False)  # its endpoint (the run's ChatServer)
    run: RolloutConfig | None = field(default=None, repr=False)  # the run's rollout settings (a multi-domain
    # recipe's parent's: partial rollouts, the engines' context); None = this domain's recipe's

    @property
    def sampling(self) -> RolloutConfig:
        """The rollout settings this domain's samples are drawn with: the run's, else its recipe's."""
        return self.run if self.run is not None else self.recipe.rollout

    @property
    def environment(self) -> str | None:
        return self.recipe.rollout.environment

    @property
    def max_new_tokens(self) -> int:
        return self.recipe.rollout.max_new_tokens

    def load(self, with_train: bool = True) -> "Domain":
        """Read the rows and load the reward plugins (errors name this domain's recipe)."""
        r = self.recipe
        if with_train:
            self.train_rows = load_rows(r.data.train, r.source, "train", r.data)
        self.eval_rows = load_rows(r.data.eval, r.source, "eval", r.data) if r.data.eval else []
        if r.rollout.environment_kind == "openai_agent" and self.agent is None:
            from mispo.scoring.plugins import ENVIRONMENT_GROUP, load_object

            self.agent = load_object(r.rollout.environment, field="rollout.environment", source=r.source,
                                     group=ENVIRONMENT_GROUP)
        if not self.environment and self.reward is None:
            from mispo.scoring.plugins import load_reward
            from mispo.scoring.reward_runner import RewardRunner

            plugins = [{k: v for k, v in p.model_dump(exclude_none=True).items() if v != {}} for p in r.reward.plugins]
            self.reward = RewardRunner(load_reward(plugins, field="reward.plugins", source=r.source),
                                       timeout_s=r.reward.timeout, failure_score=r.reward.failure_score,
                                       max_concurrency=r.reward.max_concurrency)
        return self

    def sampler(self, seed_offset: int = 0) -> PromptSampler:
        return PromptSampler(len(self.train_rows), seed=self.recipe.data.seed + seed_offset)

    # ------------------------------------------------------------------ rollouts
    def draw_requests(self, sampler: PromptSampler, count: int, tokenizer, first_group: int = 0) -> list[dict]:
        """The next `count` training rows of `sampler`, as rollout requests (see `requests`)."""
        return self.requests([self.train_rows[i] for i in sampler.next_batch(count)], tokenizer, first_group)

    def requests(self, rows: list[dict], tokenizer, first_group: int = 0) -> list[dict]:
        """Rollout requests for `rows`, rendered with this domain's chat template / system prompt;
        `group` numbers continue from `first_group` so every request of a step has its own."""
        out = []
        for i, row in enumerate(rows):
            text, ids = render_prompt(row, tokenizer, self.recipe.data)
            out.append({"prompt_ids": ids, "prompt_text": text, "row": row, "group": first_group + i})
        return out

    def sample(self, rollout, requests: list[dict], n: int, temperature: float, top_p: float = 1.0,
               seed: int | None = None) -> list[Sample]:
        """n samples (or episodes, with an environment) per request from a RolloutGroup."""
        if not requests:
            return []
        top_p = top_p if temperature > 0 else 1.0
        if self.agent is not None:
            from mispo.rollout.agent_episodes import play_agent_episodes

            if self.agent_server is None:
                raise RuntimeError(f"domain {self.name!r} plays openai_agent episodes but has no endpoint; fix: "
                                   "start one with mispo.rollout.agent_episodes.serve_agents (the trainer does)")
            ro = self.recipe.rollout
            return play_agent_episodes(rollout, self.agent_server, self.agent, requests, n=n, temperature=temperature,
                                       top_p=top_p, max_new_tokens=self.max_new_tokens, max_turns=ro.max_turns,
                                       max_episode_tokens=ro.max_episode_tokens, seed=seed)
        if self.environment:
            return rollout.generate_episodes(requests, self.environment, n=n, temperature=temperature, top_p=top_p,
                                             max_new_tokens=self.max_new_tokens,
                                             max_turns=self.recipe.rollout.max_turns, seed=seed,
                                             max_episode_tokens=self.recipe.rollout.max_episode_tokens)
        if self.sampling.partial_rollout_tokens:
            from mispo.rollout.partial import generate_partial

            return generate_partial(rollout, requests, n=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=self.max_new_tokens,
                                    segment_tokens=self.sampling.partial_rollout_tokens, seed=seed,
                                    max_model_len=self.sampling.max_model_len)
        return rollout.generate(requests, n=n, temperature=temperature, top_p=top_p,
                                max_new_tokens=self.max_new_tokens, seed=seed)

    def score(self, samples: list[Sample]) -> dict:
        """Set `Sample.reward` with the reward plugins (environment episodes come scored), then the
        overlong penalty when `reward.overlong` is set; metrics."""
        if not samples:
            return {}
        if self.reward is None:
            metrics = {"reward/mean": sum(s.reward for s in samples) / len(samples)}
            if self.agent is not None:  # calls per episode; calls left out of the sample (history rewritten)
                metrics["rollout/agent_calls"] = sum(s.reward_info["calls"] for s in samples) / len(samples)
                metrics["rollout/agent_dropped_calls"] = float(sum(s.reward_info["dropped_calls"] for s in samples))
        else:
            batch = [{**s.row, "prompt": s.row.get("prompt", s.prompt_text), "completion": s.response_text}
                     for s in samples]
            result = self.reward.score(batch)
            for s, score, extra in zip(samples, result.scores, result.extras):
                s.reward, s.reward_info = float(score), extra
            metrics = dict(result.metrics)
        overlong = self.recipe.reward.overlong
        if overlong is not None:
            penalties = [overlong_penalty(sum(s.loss_mask), self.max_new_tokens, overlong.buffer, overlong.penalty)
                         for s in samples]
            for s, p in zip(samples, penalties):
                s.reward += p
                s.overlong_penalty = p
            metrics["reward/overlong_penalty"] = sum(penalties) / len(penalties)
            metrics["reward/mean"] = sum(s.reward for s in samples) / len(samples)
        return metrics

    def evaluate(self, rollout, tokenizer) -> float:
        """Greedy accuracy on the held-out rows: mean reward of one greedy answer each (1.0 = correct)."""
        return self.greedy_answers(rollout, tokenizer)[0]

    def greedy_answers(self, rollout, tokenizer) -> tuple[float, list[dict]]:
        """(greedy accuracy, [{"prompt": the row's prompt, "completion", "reward"} per held-out row])."""
        if not self.eval_rows:
            raise ValueError(f"domain {self.name!r} has no eval rows; fix: set data.eval in {self.recipe.source}")
        samples = self.sample(rollout, self.requests(self.eval_rows, tokenizer), n=1, temperature=0.0)
        self.score(samples)
        answers = [{"prompt": s.row.get("prompt", s.prompt_text), "completion": s.response_text, "reward": s.reward}
                   for s in samples]
        return sum(s.reward for s in samples) / len(samples), answers

    def close(self) -> None:
        if self.reward is not None:
            self.reward.close()


def load_domains(recipe: Recipe, with_train: bool = True) -> list[Domain]:
    """The recipe's domains, loaded: its `domains:` entries, or itself as one domain."""
    if not recipe.domains:
        return [Domain(recipe.name, recipe, run=recipe.rollout).load(with_train)]
    children = {name: domain_recipe(recipe, name, ref) for name, ref in recipe.domains.items()}
    check_domain_settings(recipe, children)
    return [Domain(name, children[name], ref.weight, run=recipe.rollout).load(with_train)
            for name, ref in recipe.domains.items()]


def check_domain_settings(parent: Recipe, children: dict[str, Recipe]) -> None:
    """The domain recipes of a multi-domain run agree with the parent on how samples are drawn
    (config.DomainRef): a domain recipe that sets rollout.temperature, top_p or partial_rollout_tokens sets
    the parent's value; the parent's partial rollouts need single-turn domains, and act on at least one."""
    for name, child in children.items():
        for key in SHARED_SAMPLING_KEYS:
            mine, run = getattr(child.rollout, key), getattr(parent.rollout, key)
            if key in child.rollout.model_fields_set and mine != run:
                raise RecipeError(f"domain {name!r} ({child.source}) sets rollout.{key} = {mine}, but a multi-domain "
                                  f"run draws every domain's samples at the parent's rollout.{key} = {run} "
                                  f"({parent.source or 'command line'}); fix: give both the same value (e.g. "
                                  f"domains.{name}.overrides: [rollout.{key}={run}]), or remove it from the domain recipe")
    k = parent.rollout.partial_rollout_tokens
    if k is None:
        return
    for name, child in children.items():
        if child.rollout.environment:
            raise RecipeError(f"rollout.partial_rollout_tokens = {k} ({parent.source or 'command line'}) covers "
                              f"single-turn rollouts, and domain {name!r} ({child.source}) plays multi-turn episodes; "
                              "fix: remove rollout.partial_rollout_tokens, or that domain")
    if all(k >= child.rollout.max_new_tokens for child in children.values()):
        raise RecipeError(f"rollout.partial_rollout_tokens = {k} ({parent.source or 'command line'}) is not below any "
                          "domain's rollout.max_new_tokens: every response would be one segment (no effect); fix: a "
                          "smaller segment, or remove it")


def domain_recipe(parent: Recipe, name: str, ref) -> Recipe:
    """The single-domain recipe a `domains:` / `merge.experts:` entry names (relative to `parent`), with
    the parent's model.path (the domain supplies prompts, rewards and RL settings, not the model)."""
    path = resolve_path(parent, ref.recipe)
    if not Path(path).is_file():
        raise RecipeError(f"domains.{name}.recipe = {ref.recipe!r} ({parent.source or 'command line'}): no such "
                          "file; fix: give a single-domain recipe file, relative to this recipe's folder")
    # the domain is trained from whatever model the parent gives it, so its own model.path is replaced
    model = parent.model.path if parent.model.path.startswith("builtin:") else resolve_path(parent, parent.model.path)
    try:
        child = load_recipe(path, [f"model.path={model}", *ref.overrides])
    except RecipeError as exc:
        raise RecipeError(f"domain {name!r} ({path}): {exc}") from None
    if child.domains:
        raise RecipeError(f"domains.{name}.recipe = {ref.recipe!r} has domains of its own; fix: name a "
                          "single-domain recipe")
    return child


def draw_step(domains: list[Domain], samplers: dict[str, PromptSampler], total: int,
              tokenizer, first_group: int = 0) -> list[tuple[Domain, list[dict]]]:
    """One step's prompts: `total` split over the domains by weight, each domain's share drawn from its
    sampler, as [(domain, requests)] whose `group` ids run from `first_group`, unique within the step."""
    jobs = []
    for domain, count in zip(domains, split_prompts(total, [d.weight for d in domains])):
        jobs.append((domain, domain.draw_requests(samplers[domain.name], count, tokenizer, first_group)))
        first_group += count
    return jobs


def generate_step(rollout, jobs: list[tuple[Domain, list[dict]]], n: int, temperature: float, top_p: float = 1.0,
                  seed: int | None = None) -> list[tuple[Domain, list[Sample]]]:
    """[(domain, requests)] -> [(domain, samples)]: n samples (or episodes) per request; `seed` makes the
    step's sampling reproducible (each request derives its own seed from it and its group id)."""
    return [(d, d.sample(rollout, requests, n, temperature, top_p, seed=seed)) for d, requests in jobs]


def overlong_penalty(length: int, max_len: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment of a response of `length` model tokens under a limit `max_len`:
    0 up to max_len - buffer, then falling linearly to -penalty at max_len (and beyond)."""
    start = max_len - buffer
    if length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)


def step_seed(seed: int, step: int) -> int:
    """The rollout seed of training step `step` of a run seeded `seed`: distinct per step and run, the same
    after a resume. Requests add (group * n_samples + sample) * max_turns + turn to it (below 2**24), so
    step seeds are 2**24 apart; the result stays below 2**63."""
    return (seed % 2**14) * 2**48 + step * 2**24


def split_prompts(total: int, weights: list[float]) -> list[int]:
    """`total` prompts over domains in proportion to `weights` (largest remainder); every domain gets
    at least one while `total` allows."""
    if total < 1 or not weights:
        return [0] * len(weights)
    scale = total / sum(weights)
    counts = [math.floor(w * scale) for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (w := weights[i] * scale) - math.floor(w), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # no domain starves while another has more than one
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    return counts
