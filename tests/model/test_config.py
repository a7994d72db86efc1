"""Step3p5Config: the released config.json loads unchanged, round-trips, and bad fields are named."""

import json
from importlib import resources

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mispo.models.step3p5 import ConfigError, Step3p5Config, Step3p5ForCausalLM

RELEASE = json.loads(resources.files("mispo.models.step3p5").joinpath("configs/step3p5_flash.json").read_text())


def test_released_config_loads_unchanged_and_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASE))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, Step3p5Config)
    full, swa = config.attention_spec(0), config.attention_spec(1)
    assert (full.num_heads, full.num_kv_heads, full.window, full.rotary_dim) == (64, 8, None, 64)
    assert (swa.num_heads, swa.num_kv_heads, swa.window, swa.rotary_dim) == (96, 8, 512, 128)
    assert full.rope_theta == 5e6 and swa.rope_theta == 1e4
    assert full.rope_scaling["rope_type"] == "llama3" and swa.rope_scaling is None
    assert sum(t == "full_attention" for t in config.layer_types) == 12
    assert config.swiglu_limit(43, shared=False) == 7.0 and config.swiglu_limit(44, shared=True) == 16.0
    assert config.swiglu_limit(42, shared=False) == 0.0
    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in RELEASE.items():
        if key == "torch_dtype":
            continue
        assert saved[key] == value, key


@pytest.mark.parametrize("field, value, words", [
    ("layer_types", ["full_attention"] * 47, "layer_types must have"),
    ("swiglu_limits", [0.0] * 45, "swiglu_limits must have"),
    ("rope_theta", [1e4] * 46, "rope_theta must have"),
    ("num_attention_heads", 60, "num_attention_heads: 60 query heads are not divisible by 8"),
    ("moe_top_k", 300, "moe_top_k"),
    ("moe_router_activation", "relu", "moe_router_activation"),
    ("moe_layers_enum", "3,4,99", "moe_layers_enum"),
])
def test_bad_fields_are_named(field, value, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        Step3p5Config(**{**RELEASE, field: value})


def test_unknown_layer_type_is_named():
    types = list(RELEASE["layer_types"])
    types[5] = "linear_attention"
    with pytest.raises(ConfigError, match=r"layer_types\[5\]"):
        Step3p5Config(**{**RELEASE, "layer_types": types})


def test_other_setting_heads_checked():
    other = {**RELEASE["attention_other_setting"], "num_attention_heads": 90}
    with pytest.raises(ConfigError, match="attention_other_setting: 90 query heads"):
        Step3p5Config(**{**RELEASE, "attention_other_setting": other})


def test_full_model_on_meta_device_has_release_names_and_count():
    config = Step3p5Config(**RELEASE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, Step3p5ForCausalLM)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    main = sum(p.numel() for n, p in model.named_parameters()
               if not (n.startswith("model.layers.") and int(n.split(".")[2]) >= 45))
    mtp = sum(p.numel() for p in model.parameters()) - main
    assert round(main / 1e9, 2) == 196.96
    heads = 3 * 128896 * 4096
    assert round((mtp - heads) / 1e9, 2) == 0.84 and round(heads / 1e9, 2) == 1.58
    expect = {
        "model.embed_tokens.weight": (128896, 4096), "lm_head.weight": (128896, 4096),
        "model.norm.weight": (4096,),
        "model.layers.0.self_attn.q_proj.weight": (64 * 128, 4096),
        "model.layers.1.self_attn.q_proj.weight": (96 * 128, 4096),
        "model.layers.1.self_attn.o_proj.weight": (4096, 96 * 128),
        "model.layers.1.self_attn.k_proj.weight": (1024, 4096),
        "model.layers.1.self_attn.g_proj.weight": (96, 4096),
        "model.layers.0.self_attn.g_proj.weight": (64, 4096),
        "model.layers.1.self_attn.q_norm.weight": (128,),
        "model.layers.2.mlp.gate_proj.weight": (11264, 4096),
        "model.layers.2.mlp.down_proj.weight": (4096, 11264),
        "model.layers.3.moe.gate.weight": (288, 4096),
        "model.layers.3.moe.gate_proj.weight": (288, 1280, 4096),
        "model.layers.3.moe.up_proj.weight": (288, 1280, 4096),
        "model.layers.3.moe.down_proj.weight": (288, 4096, 1280),
        "model.layers.44.share_expert.gate_proj.weight": (1280, 4096),
        "model.layers.44.share_expert.down_proj.weight": (4096, 1280),
        "model.layers.45.eh_proj.weight": (4096, 8192),
        "model.layers.46.enorm.weight": (4096,),
        "model.layers.47.hnorm.weight": (4096,),
        "model.layers.47.mlp.up_proj.weight": (11264, 4096),
        "model.layers.45.transformer.shared_head.norm.weight": (4096,),
        "model.layers.45.transformer.shared_head.output.weight": (128896, 4096),
    }
    for name, shape in expect.items():
        assert shapes[name] == shape, name
    buffers = dict(model.named_buffers())
    assert buffers["model.layers.3.moe.router_bias"].shape == (288,)
    assert buffers["model.layers.3.moe.router_bias"].dtype == torch.float32
    assert not any("router_bias" in n for n in shapes)
    assert "model.layers.2.moe.gate.weight" not in shapes and "model.layers.3.mlp.gate_proj.weight" not in shapes


def test_empty_use_rope_layers_means_rope_everywhere():
    """vLLM's Step3p5 config defaults use_rope_layers to []: every layer uses RoPE."""
    from mispo.models.step3p5.tiny import tiny_config

    config = Step3p5Config(**{**tiny_config().to_dict(), "use_rope_layers": []})
    assert all(config.attention_spec(i).use_rope for i in range(config.num_hidden_layers))
    with pytest.raises(ConfigError, match="use_rope_layers"):
        Step3p5Config(**{**tiny_config().to_dict(), "use_rope_layers": [True]})
