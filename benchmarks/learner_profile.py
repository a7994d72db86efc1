"""Where the policy update's time goes: the same batch in isolation and in the loop's learner (a PolicyWorker in a Ray
actor with DeepSpeed), phase by phase, against a matmul measured in the same run.

    python benchmarks/learner_profile.py                      # float32, the vs_trl "medium" Llama, 16k tokens
    python benchmarks/learner_profile.py --dtype bfloat16 --steps 3

Rows (each the best of `--steps` updates after one warm-up):
    isolated     the update's code path on this process, no DeepSpeed, no Ray (benchmarks/learner_flops.py)
    actor        `PolicyWorker.train` in a Ray actor as the trainer starts it (num_cpus=0, learner defaults
                 with actor_mini_batches 1 as in vs_trl: zero_stage 2, which one rank runs as stage 0
                 (`learner.engine.deepspeed_stage`), 4096-token micro-batches, pi_old fused)
    actor 1 thr  the same with one torch thread: what every learner ran with before mispo set its threads
                 (Ray starts num_cpus=0 actors with OMP_NUM_THREADS=1)
Phases inside the actor: packing, forward (the model with its fused log-prob head), loss (the loss from the
log-probs), backward, optimizer, other (the rest of `train`); rpc = the driver's wall time minus the actor's `train`. GFLOP/s counts forward + backward
(benchmarks/learner_flops.model_flops_per_token); ratio = that / the matmul's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PHASES = ("packing", "forward", "loss", "backward", "optimizer", "other", "rpc")


def profiled_worker_class():
    """PolicyWorker with phase timers around its own methods (defined here, shipped to the actor by value)."""
    from mispo.learner.policy_worker import PolicyWorker

    class ProfiledPolicyWorker(PolicyWorker):
        def _timed(self, name, fn, *args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
            return out

        def micro_batches(self, samples):
            return self._timed("packing", super().micro_batches, samples)

        def _micro_loss(self, mini, mb, num_tokens):
            return self._timed("_micro_loss", super()._micro_loss, mini, mb, num_tokens)

        def backward(self, loss, mb, last):
            return self._timed("backward", super().backward, loss, mb, last)

        def _optimizer_step(self):
            return self._timed("optimizer", super()._optimizer_step)

        def profiled_train(self, batch):
            import torch

            import mispo.learner.policy_worker as policy_worker

            self.phases = {}
            forward = policy_worker.forward_logprobs  # the model's forward with its log-prob head
            policy_worker.forward_logprobs = lambda *a, **k: self._timed("forward", forward, *a, **k)
            try:
                start = time.perf_counter()
                self.train(batch)
                total = time.perf_counter() - start
            finally:
                policy_worker.forward_logprobs = forward
            p = self.phases
            p["loss"] = p.pop("_micro_loss", 0.0) - p.get("forward", 0.0)
            p["other"] = total - sum(p.values())
            return {"train_s": total, "threads": torch.get_num_threads(), **p}

    return ProfiledPolicyWorker


def make_batch(vocab: int, sequences: int):
    """`sequences` samples of a 40-token prompt and a 128-token response, GRPO-style advantages (+-1 by row)."""
    import torch

    from benchmarks.learner_flops import PROMPT, RESPONSE
    from mispo.batch import RolloutBatch, Sample

    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(5, vocab, (PROMPT,), generator=g).tolist(),
                      response_ids=torch.randint(5, vocab, (RESPONSE,), generator=g).tolist(),
                      rollout_logprobs=[-3.0] * RESPONSE, loss_mask=[1] * RESPONSE, finish_reason="length",
                      group=i // 8, reward=float(i % 2)) for i in range(sequences)]
    batch = RolloutBatch.from_samples(samples)
    batch.advantages = (batch.rewards * 2 - 1)[:, None] * batch.response_mask
    return batch


def actor_rows(model_dir: Path, dtype: str, steps: int, sequences: int) -> list[dict]:
    """The update in a Ray actor, as the trainer runs it, in the variants of the module docstring."""
    import ray

    from mispo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig
    from mispo.infra.cluster import start_ray
    from mispo.learner.group import LearnerGroup

    start_ray()
    worker_cls = profiled_worker_class()
    algorithm = AlgorithmConfig(policy_loss="grpo", advantage="grpo").model_dump()
    model = ModelConfig(path=str(model_dir), dtype=dtype).model_dump()
    batch = make_batch(json.loads((model_dir / "config.json").read_text())["vocab_size"], sequences)
    rows = []
    for label, roles in (("actor", 1), ("actor 1 thr", 2)):
        learner = LearnerConfig(actor_mini_batches=1, critic=None,
                                actor=OptimConfig(lr=1e-6, warmup_steps=0)).model_dump()
        group = LearnerGroup(worker_cls, None, str(model_dir), model=model, learner=learner, algorithm=algorithm,
                             max_new_tokens=128, concurrent_roles=roles)  # 2: half the cores, one thread here
        ref = group.share(batch)
        best = None
        for _ in range(steps + 1):  # the first is a warm-up
            start = time.perf_counter()
            inside = group.first(worker_cls.profiled_train, ref)
            inside["rpc"] = time.perf_counter() - start - inside["train_s"]
            inside["wall_s"] = time.perf_counter() - start
            best = inside if best is None or inside["wall_s"] < best["wall_s"] else best
        rows.append({"row": label, **best})
        group.kill()
    ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=2, help="timed updates per row after one warm-up")
    parser.add_argument("--sequences", type=int, default=96, help="samples per update (168 tokens each)")
    parser.add_argument("--output", type=Path, default=None, help="JSON (default: results/learner_profile_<dtype>.json)")
    args = parser.parse_args()
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    import torch

    from benchmarks.learner_flops import PROMPT, RESPONSE, learner_flops, matmul_flops, model_flops_per_token
    from benchmarks.vs_trl import CONFIGS, write_model

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="learner_profile_") as tmp:
        model_dir = write_model(CONFIGS["medium"], Path(tmp) / "llama")
        peak = matmul_flops(2048, getattr(torch, args.dtype))
        from mispo.learner.models import load_policy

        flops = model_flops_per_token(load_policy(str(model_dir), args.dtype), PROMPT + RESPONSE) * \
            args.sequences * (PROMPT + RESPONSE)
        isolated = learner_flops(model_dir, args.dtype, 4096, args.sequences, args.steps)
        rows = [{"row": "isolated", "threads": torch.get_num_threads(), "train_s": isolated["seconds"],
                 "wall_s": isolated["seconds"]}]
        rows += actor_rows(model_dir, args.dtype, args.steps, args.sequences)
    for r in rows:
        r["gflops"] = flops / r["wall_s"] / 1e9
        r["ratio"] = flops / r["wall_s"] / peak
    print(f"\n{args.dtype}: matmul {peak / 1e9:.0f} GFLOP/s; update of {args.sequences} x {PROMPT + RESPONSE} tokens, "
          f"{flops / 1e12:.2f} TFLOP forward + backward")
    print(f"{'row':<12} {'thr':>3} {'wall s':>7} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'GFLOP/s':>8} {'ratio':>6}")
    for r in rows:
        cells = " ".join(f"{r[p]:9.2f}" if p in r else f"{'':>9}" for p in PHASES)
        print(f"{r['row']:<12} {r['threads']:>3} {r['wall_s']:7.2f} {cells} {r['gflops']:8.0f} {r['ratio']:6.2f}")
    base = rows[0]["wall_s"]
    print("\nin-loop speed / isolated: " + ", ".join(f"{r['row']} {base / r['wall_s']:.2f}" for r in rows[1:]))
    out = args.output or HERE / "results" / f"learner_profile_{args.dtype}.json"
    out.write_text(json.dumps({"note": "python benchmarks/learner_profile.py; see its docstring", "dtype": args.dtype,
                               "matmul_flops_per_s": peak, "update_flops": flops, "rows": rows}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
