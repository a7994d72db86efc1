"""Second reference: transformers' Step3p7TextModel (the text tower of the later Step 3.7, same family)
loaded with our tiny release-format weights must give our final hidden states.

Their expert format fuses gate and up ([E, 2I, H]); the release keeps them apart, so the test maps keys.
"""

import json

import pytest
import torch

step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")
from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig  # noqa: E402

from mispo.models.step3p5 import Step3p5ForCausalLM  # noqa: E402
from mispo.models.step3p5.tiny import write_tiny_checkpoint  # noqa: E402


def to_step3p7(state: dict, num_layers: int) -> dict:
    out = {}
    for key, value in state.items():
        if not key.startswith("model.") or any(key.startswith(f"model.layers.{n}.")
                                                for n in range(num_layers, num_layers + 8)):
            continue
        k = key[len("model."):]
        k = k.replace(".moe.router_bias", ".mlp.gate.e_score_correction_bias")
        k = k.replace(".moe.gate.weight", ".mlp.gate.weight")
        k = k.replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
        k = k.replace(".share_expert.", ".mlp.shared_experts.")
        if ".moe.gate_proj.weight" in k:
            up = state[key.replace("gate_proj", "up_proj")]
            out[k.replace(".moe.gate_proj.weight", ".mlp.experts.gate_up_proj")] = torch.cat([value, up], dim=1)
            continue
        if ".moe.up_proj.weight" in k:
            continue
        out[k] = value
    return out


def test_matches_transformers_step3p7_text_model(tmp_path):
    # weights large enough that routing, gates and the clamps on the last layer all matter.
    # Step3p7 takes the KV-head count of every layer from num_attention_groups (the release has 8 on
    # both layer kinds, and so does the tiny config: 2).
    path = write_tiny_checkpoint(tmp_path, seed=3, init_scale=0.2)
    ours = Step3p5ForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "router_bias"):
                m.router_bias.copy_(torch.randn_like(m.router_bias) * 0.1)
    fields = json.loads((path / "config.json").read_text())
    fields.pop("model_type")
    theirs = step3p7.Step3p7TextModel(Step3p7TextConfig(**fields)).eval()
    missing, unexpected = theirs.load_state_dict(to_step3p7(ours.state_dict(), ours.config.num_hidden_layers),
                                                 strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    torch.manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))  # longer than the 16-token window
    with torch.no_grad():
        h_ours = ours.model.norm(ours(ids).hidden_states_pre_norm)
        h_theirs = theirs(input_ids=ids).last_hidden_state
    torch.testing.assert_close(h_ours, h_theirs, atol=1e-4, rtol=1e-4)
