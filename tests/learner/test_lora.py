"""LoRA on the policy: only adapters train, the merged state dict has the base model's release names
and computes what the peft model computes, the merged export round-trips, and the PolicyWorker syncs
merged weights."""

import pytest
import torch
from torch import nn

from mispo.learner.lora import apply_lora, export_merged, merged_state_dict
from mispo.learner.models import load_policy
from mispo.models.step3p5.modeling_step3p5 import (
    StackedExpertWeight,
    Step3p5MoE,
    Step3p5MTPLayer,
)

ADAPTED = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".o_proj.weight", ".g_proj.weight",
           ".gate_proj.weight", ".up_proj.weight", ".down_proj.weight")


def is_adapted(name: str, num_hidden_layers: int) -> bool:
    """Release keys that the default targets adapt: attention and dense/shared MLP linears of the
    decoder layers (not routed experts `moe.*_proj`, not the MTP layers)."""
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    return (layer is not None and layer < num_hidden_layers and name.endswith(ADAPTED) and ".moe." not in name)


def random_ids(n=2, length=12, seed=0):
    return torch.randint(7, 90, (n, length), generator=torch.Generator().manual_seed(seed))


def sft_samples(n=4, seed=0):
    from mispo.batch import Sample

    ids = random_ids(n, 10, seed).tolist()
    return [Sample(prompt_ids=row[:4], response_ids=row[4:], rollout_logprobs=[0.0] * 6, loss_mask=[1] * 6,
                   finish_reason="stop", group=i, reward=0.0) for i, row in enumerate(ids)]


def all_tensors(worker, bucket_bytes=256 << 20) -> dict[str, torch.Tensor]:
    return dict(kv for bucket in worker.weight_buckets(bucket_bytes) for kv in bucket)


@pytest.fixture()
def trained(tiny_checkpoint):
    """(base, peft model after one AdamW step on the adapters with lr 1e-2)."""
    torch.manual_seed(0)
    base = load_policy(tiny_checkpoint).eval()
    model = apply_lora(load_policy(tiny_checkpoint), {"r": 4, "alpha": 8})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return base, model.eval()


def test_merged_state_dict_names_and_logits(trained, tiny_checkpoint):
    base, model = trained
    merged = merged_state_dict(model)
    assert list(merged) == list(base.state_dict())
    assert any(k.endswith("moe.router_bias") for k in merged)
    plain = load_policy(tiny_checkpoint).eval()
    plain.load_state_dict(merged, strict=True)
    ids = random_ids(seed=2)
    with torch.no_grad():
        want, got, before = model(input_ids=ids).logits, plain(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - before).abs().max() > 1e-4
    # the live model is untouched: still a peft model whose base weights are the original ones
    w = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(w, base.model.layers[0].self_attn.q_proj.weight, atol=0, rtol=0)


def test_only_lora_trains_router_and_experts_untouched(trained):
    base, model = trained
    n = base.config.num_hidden_layers
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    inner = model.get_base_model()
    for m in inner.modules():
        if isinstance(m, Step3p5MoE):
            assert type(m.gate) is nn.Linear  # router: not wrapped
            assert all(isinstance(getattr(m, p), StackedExpertWeight) for p in ("gate_proj", "up_proj", "down_proj"))
        if isinstance(m, Step3p5MTPLayer):
            assert not any(".lora_" in name for name, _ in m.named_parameters())
    merged, original = merged_state_dict(model), base.state_dict()
    for name, tensor in original.items():
        changed = not torch.equal(merged[name], tensor)
        assert changed == is_adapted(name, n), name
    assert sum(is_adapted(name, n) for name in original) == 8 * n  # q/k/v/o/g_proj + dense or shared gate/up/down


def test_export_merged_round_trips(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = trained
    out = export_merged(model, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert set(loaded.state_dict()) == set(merged_state_dict(model))
    ids = random_ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_user_target_modules_match_linears_only(tiny_checkpoint):
    model = apply_lora(load_policy(tiny_checkpoint), {"r": 2, "target_modules": ["gate_proj", "gate"]})
    adapted = {name for name, _ in model.named_parameters() if ".lora_A." in name}
    assert adapted and all(".gate_proj.lora_A." in name for name in adapted)  # no router, no stacked experts
    with pytest.raises(ValueError, match="no Linear module"):
        apply_lora(load_policy(tiny_checkpoint), {"target_modules": ["nonexistent"]})


@pytest.mark.slow  # starts DeepSpeed engines
def test_policy_worker_lora_syncs_merged_weights(tiny_checkpoint, tmp_path):
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from mispo.config import LearnerConfig, ModelConfig, OptimConfig
    from mispo.learner.policy_worker import PolicyWorker

    learner = LearnerConfig(zero_stage=2, micro_batch_tokens=40, actor=OptimConfig(lr=1e-2, warmup_steps=0),
                            critic=None).model_dump()
    algo = {}
    full = PolicyWorker(str(tiny_checkpoint), ModelConfig().model_dump(), learner, algo, max_new_tokens=8,
                        master_port=29741)
    lora = PolicyWorker(str(tiny_checkpoint), ModelConfig(lora={"r": 4}).model_dump(), learner, algo,
                        max_new_tokens=8, master_port=29741)
    trainable = [n for n, p in lora.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    before = all_tensors(full)
    assert list(all_tensors(lora)) == list(before)

    metrics = lora.sft_step(sft_samples())
    assert metrics["sft/loss"] > 0
    buckets = lora.weight_buckets(bucket_bytes=20_000)
    after = dict(kv for b in buckets for kv in b)
    assert len(buckets) > 1 and [n for b in buckets for n, _ in b] == list(before)
    n = full.engine.module.config.num_hidden_layers
    for name, tensor in before.items():
        assert (not torch.equal(after[name], tensor)) == is_adapted(name, n), name

    # DeepSpeed checkpoints hold the peft-wrapped module: save, move on, load back
    lora.save(str(tmp_path / "ckpt"), tag="s1")
    lora.sft_step(sft_samples(seed=1))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(all_tensors(lora)[key], after[key])
    lora.load(str(tmp_path / "ckpt"), tag="s1")
    for name, tensor in all_tensors(lora).items():
        torch.testing.assert_close(tensor, after[name], atol=0, rtol=0)

    # the export is the merged model in plain release format
    loaded = AutoModelForCausalLM.from_pretrained(lora.export(str(tmp_path / "final")))
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, after[name], atol=0, rtol=0)
