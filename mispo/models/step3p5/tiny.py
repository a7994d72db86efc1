"""Tiny Step3p5 checkpoints for laptops, tests and CI: every mechanism of the full model, small.

    config = tiny_config()                      # 4 layers: full + SWA, dense + MoE, clamps, 1 MTP layer
    write_tiny_checkpoint(path, seed=0)         # config.json + safetensors + tokenizer, release format

The tokenizer is character level (digits, letters, punctuation, a few chat tokens), built offline
with `tokenizers`; no hub access is needed.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .configuration_step3p5 import Step3p5Config

SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|eot|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eot|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_vocab() -> list[str]:
    return SPECIAL_TOKENS + CHARS


def tiny_config(num_hidden_layers: int = 4, hidden_size: int = 64, num_nextn_predict_layers: int = 1,
                sliding_window: int = 16, head_dim: int = 32, **overrides) -> Step3p5Config:
    """A small config with the release's structure: layer i is full attention when i % 4 == 0, else
    sliding; layer 0 dense, the rest MoE; the last layer has routed and shared SwiGLU clamps."""
    n_all = num_hidden_layers + num_nextn_predict_layers
    layer_types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n_all)]
    last = num_hidden_layers - 1
    fields = dict(
        vocab_size=len(tiny_vocab()), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_attention_groups=2, head_dim=head_dim,
        attention_other_setting={"attention_type": "sliding_attention", "num_attention_heads": 4,
                                 "num_attention_groups": 2, "head_dim": head_dim},
        max_position_embeddings=4096, sliding_window=sliding_window, layer_types=layer_types,
        rope_theta=[5e6 if t == "full_attention" else 1e4 for t in layer_types],
        partial_rotary_factors=[0.5 if t == "full_attention" else 1.0 for t in layer_types],
        rope_scaling={"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 512,
                      "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        yarn_only_types=["full_attention"],
        moe_layers_enum=",".join(str(i) for i in range(1, num_hidden_layers)),
        moe_num_experts=8, moe_top_k=2, moe_intermediate_size=hidden_size, share_expert_dim=hidden_size,
        swiglu_limits=[7.0 if i == last else 0.0 for i in range(n_all)],
        swiglu_limits_shared=[16.0 if i == last else 0.0 for i in range(n_all)],
        num_nextn_predict_layers=num_nextn_predict_layers,
        bos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        eos_token_id=[SPECIAL_TOKENS.index("<|endoftext|>"), SPECIAL_TOKENS.index("<|eot|>")],
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        architectures=["Step3p5ForCausalLM"],
    )
    fields.update(overrides)
    return Step3p5Config(**fields)


def tiny_tokenizer():
    """A character-level PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|eot|>", bos_token="<|endoftext|>",
        pad_token="<pad>", chat_template=CHAT_TEMPLATE,
    )
    return tok


def write_tiny_checkpoint(path: str | Path, seed: int = 0, config: Step3p5Config | None = None,
                          init_scale: float = 0.02, **config_overrides) -> Path:
    """Write a randomly initialised tiny Step3p5 checkpoint (fp32) with its tokenizer to `path`."""
    from .modeling_step3p5 import Step3p5ForCausalLM

    path = Path(path)
    config = config or tiny_config(**config_overrides)
    config.initializer_range = init_scale
    torch.manual_seed(seed)
    model = Step3p5ForCausalLM(config)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return path
