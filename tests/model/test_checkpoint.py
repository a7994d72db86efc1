"""Release-format checkpoints: single file and sharded, MTP present or absent, Auto classes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mispo.models.step3p5 import Step3p5ForCausalLM
from mispo.models.step3p5.tiny import tiny_config


def _model(**overrides):
    torch.manual_seed(0)
    return Step3p5ForCausalLM(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_round_trip_single_and_sharded(tmp_path, shard):
    model = _model()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists() == bool(shard)
    if shard:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1
        assert "model.layers.1.moe.gate_proj.weight" in weight_map
        assert "model.layers.1.moe.router_bias" in weight_map
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Step3p5ForCausalLM)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    ids = torch.randint(0, 90, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)


def test_stacked_expert_tensors_in_file(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        cfg = model.config
        assert f.get_slice("model.layers.2.moe.up_proj.weight").get_shape() == [
            cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size]
        assert f.get_slice("model.layers.2.moe.down_proj.weight").get_shape() == [
            cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size]
    n = cfg.num_hidden_layers
    assert f"model.layers.{n}.transformer.shared_head.output.weight" in keys
    assert not any("inv_freq" in k for k in keys)


def test_router_bias_survives_round_trip(tmp_path):
    model = _model()
    with torch.no_grad():
        model.model.layers[1].moe.router_bias.copy_(torch.linspace(-1, 1, 8))
    model.save_pretrained(tmp_path)
    loaded = Step3p5ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.layers[1].moe.router_bias, torch.linspace(-1, 1, 8))


def test_checkpoint_without_mtp_layers_loads(tmp_path):
    model = _model()
    n = model.config.num_hidden_layers
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"model.layers.{n}.")}
    from safetensors.torch import save_file
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    loaded = Step3p5ForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.mtp_layers == [] and loaded.config.load_mtp_layers is False
    ids = torch.randint(0, 90, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
