"""What `mispo generate` runs: samples from a Step3p5 (or any Hugging Face) checkpoint with vLLM or
transformers.

With no model given it writes the built-in tiny Step3p5 checkpoint to the cache folder first, so it
runs on a fresh CPU machine with no downloads (a random tiny model prints random characters; the
point is the whole serving path: release-format checkpoint -> vLLM engine -> tokens and log-probs).
"""

from __future__ import annotations

import os
from pathlib import Path


def tiny_model_dir() -> Path:
    """The built-in tiny checkpoint (the default recipe's), written once into the run cache."""
    from mispo.config import Recipe
    from mispo.prepare_model import base_model_path

    return base_model_path(Recipe())


def generate(model: str | Path, prompts: list[str], engine: str = "vllm", max_tokens: int = 32,
             temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Returns per prompt {prompt, text, token_ids, logprobs, finish_reason}."""
    if engine == "vllm":
        return _generate_vllm(str(model), prompts, max_tokens, temperature, seed)
    if engine == "hf":
        return _generate_hf(str(model), prompts, max_tokens, temperature, seed)
    raise ValueError(f"engine = {engine!r}: use 'vllm' or 'hf'")


def _generate_vllm(model, prompts, max_tokens, temperature, seed):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=seed, max_model_len=1024,
              gpu_memory_utilization=float(os.environ.get("MISPO_VLLM_MEMORY", "0.2")))
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=seed)
    results = []
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        c = out.outputs[0]
        lps = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else []
        results.append({"prompt": prompt, "text": c.text, "token_ids": list(c.token_ids), "logprobs": lps,
                        "finish_reason": c.finish_reason})
    return results


def _generate_hf(model, prompts, max_tokens, temperature, seed):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mispo.models.step3p5  # noqa: F401  (registers model_type step3p5)

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    results = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                              output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:]
        lps = [torch.log_softmax(s[0].float() / max(temperature, 1e-6), -1)[t].item() for s, t in zip(out.scores, new)]
        eos = set(lm.generation_config.eos_token_id or [])
        finish = "stop" if new.numel() and int(new[-1]) in eos else "length"
        results.append({"prompt": prompt, "text": tok.decode(new, skip_special_tokens=True),
                        "token_ids": new.tolist(), "logprobs": lps, "finish_reason": finish})
    return results
