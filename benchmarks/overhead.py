"""mispo's step against its limit, measured in one run: the same requests through a bare `vllm.LLM.generate` and
the same tokens through a bare forward + backward + AdamW step.

    python benchmarks/overhead.py                              # vs_trl's medium Llama, fp32, sync and async
    python benchmarks/overhead.py --config tiny --modes sync --steps 6
    python benchmarks/overhead.py --dtype bfloat16 --json benchmarks/results/overhead.json

The mispo side is `benchmarks/vs_trl.py`'s recipe (random weights, the arithmetic prompts with the chat template,
GRPO, one optimizer step per step on the whole batch) in a `python -m mispo train` subprocess; its s/step is
`time/step_s` over the steps after the first. The limit, each part in a subprocess of its own after a warm-up:

    generation  vllm.LLM(**mispo's own engine kwargs, minus mispo's worker extension).generate of the same
                prompt tokens (chat template as mispo renders it), n = samples, temperature 1, every answer
                exactly the run's mean response length (ignore_eos: the same tokens as mispo generated), the
                same dtype: the mean over --repeats batches (consecutive rows of the prompts)
    update      one forward + backward + AdamW step in plain torch over the run's mean tokens per step
                (prompt and response lengths at the run's means, packed in the learner's micro-batches),
                log-probs through the same fused head: the best of --repeats

    sync ratio  = mispo s/step / (generation + update)             goal <= 1.15
    async ratio = mispo s/step / max(generation, update)           goal <= 1.10

Each part runs on the cores the run gives its role (`mispo.infra.cpu_split.split_cores`): every core in sync
mode, half each in async mode on a CPU machine, so the async limit is what the two halves can do side by side.

Everything else mispo does per step (reward, the pi_old pass when not fused, advantages and masks, weight sync,
RPCs, metrics) is the overhead the ratio shows. On a shared machine the numbers move with the load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the repository root first, and not this folder: its kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]
GOALS = {"sync": 1.15, "async": 1.10}


# --------------------------------------------------------------------------- the limit's two parts (children)
def raw_generation(model_dir: str, recipe: dict, prompts_file: str, repeats: int, cores: list[int] | None,
                   response_len: int) -> dict:
    """Seconds of one step's generation on a bare vLLM engine (pinned to `cores` as the run pins its engines):
    mean of `repeats` batches after a warm-up one."""
    from mispo.infra.cpu_split import pin_process

    pin_process(cores)  # before the engine starts its threads, as mispo's rollout worker does
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import engine_kwargs

    r = recipe["rollout"]
    kwargs = engine_kwargs(model_dir, RolloutConfig(**r), r["dtype"], seed=0, cpu=True)
    kwargs.pop("worker_extension_cls", None)  # a plain engine: nothing of mispo's inside it
    llm = LLM(**kwargs)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines()]
    texts = [TokensPrompt(prompt_token_ids=ids) for ids in rendered_prompts(tok, rows)]  # the learner's tokens
    # every answer exactly the run's mean length: the same number of tokens as mispo's measured steps generated
    # (the policy learns to answer shorter as it trains; the untrained engine would not)
    params = SamplingParams(n=r["n_samples"], temperature=1.0, top_p=1.0, min_tokens=response_len,
                            max_tokens=response_len, ignore_eos=True)
    per = r["prompts_per_step"]
    times, tokens = [], []
    for i in range(repeats + 1):
        batch = texts[i * per:(i + 1) * per]
        start = time.perf_counter()
        out = llm.generate(batch, params, use_tqdm=False)
        if i:  # the first batch warms the engine
            times.append(time.perf_counter() - start)
            tokens.append(sum(len(c.token_ids) for o in out for c in o.outputs))
    return {"seconds": sum(times) / len(times), "tokens": sum(tokens) / len(tokens)}


def bare_update(model_dir: str, dtype: str, prompt_len: int, response_len: int, sequences: int,
                micro_batch_tokens: int, repeats: int, cores: list[int] | None) -> dict:
    """Seconds of one forward + backward + AdamW step over `sequences` packed samples, plain torch (no DeepSpeed,
    no Ray; on `cores` as the run pins its learner): the best of `repeats` after a warm-up step."""
    import torch

    from mispo.infra.cpu_split import pin_process

    pin_process(cores)

    from mispo.batch import Sample
    from mispo.learner.models import load_policy
    from mispo.learner.packing import forward_logprobs, gather_response, pack_samples

    model = load_policy(model_dir, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    samples = [Sample(prompt_ids=torch.randint(5, vocab, (prompt_len,), generator=g).tolist(),
                      response_ids=torch.randint(5, vocab, (response_len,), generator=g).tolist(),
                      rollout_logprobs=[0.0] * response_len, loss_mask=[1] * response_len,
                      finish_reason="length", group=i, reward=0.0) for i in range(sequences)]
    micro = pack_samples(samples, list(range(sequences)), micro_batch_tokens)

    def step() -> float:
        start = time.perf_counter()
        for mb in micro:
            logp, _ = forward_logprobs(model, mb)
            (-gather_response(logp, mb, response_len).sum() / (sequences * response_len)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    return {"seconds": min(step() for _ in range(repeats)), "micro_batches": len(micro)}


def child(kind: str, payload: dict) -> dict:
    """Run one part of the limit in a fresh Python process (vLLM and torch threads set as on their own)."""
    with tempfile.TemporaryDirectory(prefix=f"overhead_{kind}_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--payload", json.dumps(payload),
               "--json", str(result)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode or not result.exists():
            raise RuntimeError(f"{kind} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        return json.loads(result.read_text())


# --------------------------------------------------------------------------- one configuration
def rendered_prompts(tok, rows: list[dict]) -> list[list[int]]:
    """The prompts' token ids as mispo renders them (chat template, then no special tokens added)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                     tokenize=False) for row in rows]
    return [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def mean_prompt_tokens(model_dir: Path, prompts: Path) -> float:
    """Mean tokens of the task's prompts rendered with the chat template (what the engines and learner see)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in rendered_prompts(tok, [json.loads(line) for line in prompts.read_text().splitlines()])]
    return sum(lengths) / len(lengths)


def measure(config: str, dtype: str, modes: list[str], steps: int, repeats: int) -> list[dict]:
    from benchmarks.mispo_run import train
    from benchmarks.vs_trl import CONFIGS, mispo_recipe, write_model, write_prompts
    from mispo.infra.cpu_split import available_cores, split_cores

    setup = CONFIGS[config]
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"overhead_{config}_") as tmp:
        work = Path(tmp)
        model_dir = write_model(setup, work / "model")
        prompts = write_prompts(work / "prompts.jsonl")
        for mode in modes:
            recipe = mispo_recipe(setup, model_dir, prompts, steps, dtype, mode)
            metrics = [m for m in train(recipe, work / f"mispo_{mode}", f"mispo train ({mode})")
                       if "time/step_s" in m][1:]
            step_s = sum(m["time/step_s"] for m in metrics) / len(metrics)
            response = sum(m["rollout/response_len"] for m in metrics) / len(metrics)
            prompt = mean_prompt_tokens(model_dir, prompts)
            sequences = setup.prompts * setup.samples
            split = split_cores(0, mode, available_cores(), 1)  # the run's own split (async: half each)
            gen = child("generation", {"model_dir": str(model_dir), "recipe": recipe, "prompts_file": str(prompts),
                                       "repeats": repeats, "cores": split.rollout[0] if split.rollout else None,
                                       "response_len": max(1, round(response))})
            upd = child("update", {"model_dir": str(model_dir), "dtype": dtype, "prompt_len": max(1, round(prompt)),
                                   "response_len": max(1, round(response)), "sequences": sequences,
                                   "micro_batch_tokens": 4096, "repeats": repeats, "cores": split.learner})
            limit = gen["seconds"] + upd["seconds"] if mode == "sync" else max(gen["seconds"], upd["seconds"])
            parts = {k: sum(m.get(k, 0.0) for m in metrics) / len(metrics)
                     for k in ("time/generate_s", "time/reward_s", "time/forward_s", "time/train_s",
                               "time/weight_sync_s")}
            rows.append({"config": config, "dtype": dtype, "mode": mode, "mispo_s_per_step": step_s,
                         "generation_s": gen["seconds"], "update_s": upd["seconds"], "limit_s": limit,
                         "ratio": step_s / limit, "goal": GOALS[mode], "response_len": response,
                         "prompt_len": prompt, "raw_generation_tokens": gen["tokens"], "mispo_parts": parts})
            print(f"[{config} {dtype} {mode}] mispo {step_s:.2f} s/step; generation {gen['seconds']:.2f} s, "
                  f"update {upd['seconds']:.2f} s -> limit {limit:.2f} s; ratio {step_s / limit:.2f} "
                  f"(goal <= {GOALS[mode]})", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="medium", help="a configuration of benchmarks/vs_trl.py")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--modes", type=lambda v: v.split(","), default=["sync", "async"])
    parser.add_argument("--steps", type=int, default=4, help="mispo steps per mode (the first is not measured)")
    parser.add_argument("--repeats", type=int, default=2, help="measured batches / updates of the limit's parts")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=["generation", "update"], help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        fn = raw_generation if args.child == "generation" else bare_update
        args.json.write_text(json.dumps(fn(**json.loads(args.payload))))  # vLLM prints on stdout too
        return 0
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = measure(args.config, args.dtype, args.modes, args.steps, args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"\n{'mode':<6} {'mispo s/step':>12} {'generation':>10} {'update':>7} {'limit':>6} {'ratio':>6} {'goal':>5}")
    for r in rows:
        print(f"{r['mode']:<6} {r['mispo_s_per_step']:>12.2f} {r['generation_s']:>10.2f} {r['update_s']:>7.2f} "
              f"{r['limit_s']:>6.2f} {r['ratio']:>6.2f} {r['goal']:>5.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"note": "python benchmarks/overhead.py; see its docstring",
                                         "rows": rows}, indent=1) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
