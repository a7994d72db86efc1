"""Rollout speed: RolloutWorker against raw vLLM, and weight-sync time: Ray object store and broadcast.

    python benchmarks/rollout.py                   # tiny model; sync also for hidden 512, 8 layers
    python benchmarks/rollout.py --prompts 128 --n 8 --max-new-tokens 128 --skip-sync
    python benchmarks/rollout.py --skip-generate    # weight sync only
    VLLM_ENABLE_V1_MULTIPROCESSING=1 python benchmarks/rollout.py   # engine core in its own process

Generation (goal: ratio >= 0.9): one engine, one prompt set, the same seeds, so both paths make
the same tokens: `RolloutWorker.generate` (token ids in, `Sample`s out) against `vllm.LLM.generate`
on the worker's own engine with the same SamplingParams. Runs alternate after --warmup rounds;
median and best over --reps. On a shared machine the rates swing with the load, so the script also
times the worker's own work (everything outside `llm.generate`) inside the same calls: the ratio
engine / (engine + overhead) is the worker's cost free of that noise.

Weight sync, per model size: the full state dict in --bucket-mb buckets, put in the object store
by the driver (`put_bucket`'s numpy layout, and plain `ray.put` of torch tensors), then
`RolloutGroup.sync` to a 1-worker group (the actor resolves the refs and loads them through
vLLM's layerwise reload); baseline: the same in-memory buckets loaded into an engine in this
process (`RolloutWorker.update_weights`, no object store). Best of --reps after a warm-up sync.
Broadcast (`RolloutGroup.sync_broadcast`, `mispo.weights.broadcast` over gloo): a sender actor standing
in for learner rank 0 (`PolicyWorker.broadcast_weights` without DeepSpeed: the same buckets sent, then
put in the object store for crash recovery) broadcasts to the worker's vLLM engine. Link: a plain gloo
broadcast of one tensor of the model's size between two other actors; `bytes / link` is the time the
wire alone would take, and the sync's multiple of it is what flattening, loading and the protocol add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the repository root first, and not this folder: its kernels.py would shadow the `kernels`
# package that transformers probes for
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

ENGINE = {"kv_cache_memory_bytes": 1 << 30}


def buckets_of(path: Path, bucket_bytes: int):
    """The training model's state dict in buckets (as PolicyWorker.weight_buckets), and its bytes."""
    import torch

    from mispo.models.step3p5 import Step3p5ForCausalLM

    state = Step3p5ForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    buckets, current, size = [], [], 0
    for name, tensor in state.items():
        current.append((name, tensor.detach().clone()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    buckets += [current] if current else []
    return buckets, sum(t.numel() * t.element_size() for b in buckets for _, t in b)


def bench_generate(model: Path, args) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import RolloutWorker

    t = time.perf_counter()
    worker = RolloutWorker(str(model), RolloutConfig(engine_kwargs=ENGINE).model_dump())
    print(f"engine start: {time.perf_counter() - t:.1f} s (in_process={worker.in_process})")
    reqs = [{"prompt_ids": [3] + [5 + (i * 7 + j) % 90 for j in range(16)] + [4], "prompt_text": "",
             "row": {}, "group": i} for i in range(args.prompts)]
    new = args.max_new_tokens

    def raw():
        params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=new, logprobs=0,
                                 seed=r["group"] * args.n) for r in reqs]
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in reqs]
        outs = generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    generate, engine_s, overhead_s = worker.llm.generate, [], []

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = generate(*a, **k)
        engine_s.append(time.perf_counter() - t)
        return out

    def ours():
        worker.llm.generate = timed_generate
        try:
            t = time.perf_counter()
            samples = worker.generate(reqs, n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=new, seed=0)
            overhead_s.append(time.perf_counter() - t - engine_s[-1])
            return sum(len(s.response_ids) for s in samples)
        finally:
            worker.llm.generate = generate

    for _ in range(args.warmup):  # oneDNN builds kernels per batch shape: warm up both paths
        ours(), raw()
    rates = {"raw": [], "worker": []}
    for _ in range(args.reps):
        for name, fn in (("raw", raw), ("worker", ours)):
            t = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - t))
    (raw_m, raw_b), (ours_m, ours_b) = ((statistics.median(r), max(r)) for r in rates.values())
    overhead = statistics.median(o / (o + e) for o, e in zip(overhead_s, engine_s))
    print(f"generation: {args.prompts} prompts x n={args.n}, <= {new} new tokens ({tokens} tokens); "
          f"tok/s, median / best of {args.reps}:")
    print(f"  raw vllm.LLM.generate   {raw_m:8.0f} / {raw_b:8.0f}")
    print(f"  RolloutWorker.generate  {ours_m:8.0f} / {ours_b:8.0f}   ratio {ours_m / raw_m:.3f} / "
          f"{ours_b / raw_b:.3f}   (goal >= 0.9)")
    print(f"  worker's own work: {statistics.median(overhead_s) * 1e3:.1f} ms per call, "
          f"{overhead * 100:.2f}% of it; ratio free of load noise {1 - overhead:.3f}")
    worker.shutdown()


class Sender:
    """Learner rank 0's side of a broadcast sync, without DeepSpeed (PolicyWorker.broadcast_weights)."""

    def __init__(self, model: str, bucket_bytes: int):
        self.buckets, self.total = buckets_of(Path(model), bucket_bytes)

    def send(self, group: dict) -> list:
        from mispo.weights.broadcast import join, send_buckets
        from mispo.weights.transport import put_bucket

        send_buckets(join(group, 0, "cpu"), self.buckets)
        return [put_bucket(b) for b in self.buckets]


class LinkPeer:
    """One end of the link baseline: a plain broadcast of one uint8 tensor over a 2-member gloo group."""

    def broadcast(self, group: dict, rank: int, nbytes: int) -> float:
        import torch

        from mispo.weights.broadcast import join

        member = join(group, rank, "cpu")
        tensor = (torch.ones if rank == 0 else torch.empty)(nbytes, dtype=torch.uint8)
        member.broadcast(tensor[:1])  # both ends ready
        t = time.perf_counter()
        member.broadcast(tensor)
        seconds = time.perf_counter() - t
        assert rank == 0 or bool(tensor[-1] == 1)
        return seconds


def bench_link(nbytes: int, reps: int) -> float:
    """Best seconds of a gloo broadcast of `nbytes` between two processes (Ray actors)."""
    import ray

    from mispo.weights.broadcast import Rendezvous

    rendezvous = Rendezvous(ray.util.get_node_ip_address())
    group = rendezvous.group(2, "gloo")
    peers = [ray.remote(num_cpus=0)(LinkPeer).remote() for _ in range(2)]
    best = min(max(ray.get([p.broadcast.remote(group, r, nbytes) for r, p in enumerate(peers)]))
               for _ in range(reps + 1))
    for p in peers:
        ray.kill(p)
    return best


def bench_sync(name: str, model: Path, args) -> None:
    import ray

    from mispo.config import RolloutConfig
    from mispo.rollout.group import RolloutGroup
    from mispo.rollout.vllm_engine import RolloutWorker
    from mispo.weights.transport import put_bucket

    buckets, total = buckets_of(model, args.bucket_mb << 20)
    cfg = RolloutConfig(num_workers=1, engine_kwargs=ENGINE)
    group = RolloutGroup(str(model), cfg)
    timings = {}
    for layout, put in (("put_bucket (numpy, zero-copy)", put_bucket), ("ray.put (pickled torch)", ray.put)):
        group.sync([put(b) for b in buckets], 0)  # warm-up
        puts, syncs, loads = [], [], []
        for version in range(1, args.reps + 1):
            t = time.perf_counter()
            refs = [put(b) for b in buckets]
            puts.append(time.perf_counter() - t)
            t = time.perf_counter()
            loads.append(group.sync(refs, version))
            syncs.append(time.perf_counter() - t)
            del refs
        timings[layout] = [min(x) for x in (puts, syncs, loads)]
    sender = ray.remote(num_cpus=0)(Sender).remote(str(model), args.bucket_mb << 20)
    send = lambda g: [sender.send.remote(g)]  # noqa: E731
    group.sync_broadcast(send, 0)  # warm-up (and the group's forming)
    casts, cast_loads = [], []
    for version in range(1, args.reps + 1):
        ray.get(group.buckets)  # the sender's object-store copy is done (in a run it overlaps the rollouts)
        t = time.perf_counter()
        cast_loads.append(group.sync_broadcast(send, version))
        casts.append(time.perf_counter() - t)
    group.shutdown()
    ray.kill(sender)
    link = bench_link(total, args.reps)
    local = RolloutWorker(str(model), cfg.model_dump())
    base = min([local.update_weights(buckets, v) for v in range(args.reps + 1)][1:])  # [0]: warm-up
    local.shutdown()
    print(f"weight sync, {name}: {total / 2**20:.1f} MiB in {len(buckets)} buckets of "
          f"<= {args.bucket_mb} MiB (ms, best of {args.reps})")
    print(f"  {'layout':30s} {'put':>7s} {'sync':>7s} {'in actor':>8s} {'total':>7s}  vs in-process load")
    for layout, (put, sync, load) in timings.items():
        print(f"  {layout:30s} {put * 1e3:7.1f} {sync * 1e3:7.1f} {load * 1e3:8.1f} {(put + sync) * 1e3:7.1f}"
              f"  {(put + sync) / base:.2f}x  ({total / 1e9 / (put + sync):.2f} GB/s)")
    cast, cast_load = min(casts), min(cast_loads)
    print(f"  {'broadcast (gloo)':30s} {'':7s} {cast * 1e3:7.1f} {cast_load * 1e3:8.1f} {cast * 1e3:7.1f}"
          f"  {cast / base:.2f}x  ({total / 1e9 / cast:.2f} GB/s)")
    print(f"  link: gloo broadcast of one {total / 2**20:.1f} MiB tensor between two processes: "
          f"{link * 1e3:.1f} ms ({total / 1e9 / link:.2f} GB/s); broadcast sync = {cast / link:.1f}x bytes / link")
    print(f"  baseline: the same in-memory buckets loaded in this process: {base * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()

    import ray

    from mispo.models.step3p5.tiny import write_tiny_checkpoint

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, init_scale=0.2)
        if not args.skip_generate:
            bench_generate(tiny, args)
        if not args.skip_sync:
            bigger = write_tiny_checkpoint(Path(tmp) / "h512", seed=0, hidden_size=512, num_hidden_layers=8)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            bench_sync("tiny (hidden 64, 4 layers)", tiny, args)
            bench_sync("hidden 512, 8 layers", bigger, args)
            ray.shutdown()
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
