"""What `mispo generate` runs: samples from a Step3p5 (or any Hugging Face) checkpoint with vLLM (the rollout
workers' engine, `rollout.vllm_engine.RolloutWorker`, in this process) or transformers.

Prompts go through the tokenizer's chat template, as training renders them (`data.render_prompt`), unless
`raw`; the engine's context is the model's own (`rollout.max_model_len` left out). With no model given it writes
the built-in tiny Step3p5 checkpoint to the cache folder first, so it runs on a fresh CPU machine with no
downloads (a random tiny model prints random characters).
"""

from __future__ import annotations

from pathlib import Path


def tiny_model_dir() -> Path:
    """The built-in tiny checkpoint (the default recipe's), written once into the run cache."""
    from mispo.config import Recipe
    from mispo.prepare_model import base_model_path

    return base_model_path(Recipe())


def prompt_ids(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """The token ids the model sees: the chat-templated user turn, as training renders a string prompt
    (`data.render_prompt`), or with `raw` (or a tokenizer without a template) the plain text."""
    from mispo.config import DataConfig
    from mispo.data import render_prompt

    return render_prompt({"prompt": prompt}, tokenizer, DataConfig(chat_template=not raw))[1]


def sample_completions(model: str | Path, prompts: list[str], engine: str = "vllm", max_tokens: int = 32,
             temperature: float = 1.0, seed: int = 0, raw: bool = False) -> list[dict]:
    """Returns per prompt {prompt, text, token_ids, logprobs, finish_reason}."""
    if engine == "vllm":
        return _generate_vllm(str(model), prompts, max_tokens, temperature, seed, raw)
    if engine == "hf":
        return _generate_hf(str(model), prompts, max_tokens, temperature, seed, raw)
    raise ValueError(f"engine = {engine!r}: use 'vllm' or 'hf'")


def _generate_vllm(model, prompts, max_tokens, temperature, seed, raw):
    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import RolloutWorker

    worker = RolloutWorker(model, RolloutConfig().model_dump(), seed=seed)
    try:
        requests = [{"prompt_ids": prompt_ids(worker.tokenizer, p, raw), "prompt_text": p, "group": i}
                    for i, p in enumerate(prompts)]
        samples = worker.generate(requests, n=1, temperature=temperature, top_p=1.0, max_new_tokens=max_tokens,
                                  seed=seed)
    finally:
        worker.shutdown()
    return [{"prompt": s.prompt_text, "text": s.response_text, "token_ids": s.response_ids,
             "logprobs": s.rollout_logprobs, "finish_reason": s.finish_reason} for s in samples]


def _generate_hf(model, prompts, max_tokens, temperature, seed, raw):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mispo.models.step3p5  # noqa: F401  (registers model_type step3p5)

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tok, prompt, raw)])
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
