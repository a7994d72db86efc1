"""Routing replay (R3): the learner takes the engine's expert selection and keeps its own weights.

Router biases change only which experts are chosen (the weights come from the unbiased scores), so a
model whose biases differ is an "engine" with other routing: replaying its selection in the trainer must
give exactly its logits, and the trainer's own selection must give the trainer's."""

import copy

import pytest
import torch

from mispo.batch import Sample
from mispo.learner.packing import pack_samples
from mispo.models.step3p5 import Step3p5ForCausalLM
from mispo.models.step3p5.moe_utils import moe_layers
from mispo.learner.packing import routed_rows
from mispo.models.step3p5.routing_replay import check_replayable, replay_routing
from mispo.models.step3p5.tiny import tiny_config


def _model():
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3, hidden_size=32, num_nextn_predict_layers=0)
    config.moe_backend = config.attn_backend = "torch"
    return Step3p5ForCausalLM(config).eval()


def _record(model, ids) -> torch.Tensor:
    """What an engine records: [N, num_hidden_layers, K] selected experts (dense layers' rows 0)."""
    with torch.no_grad():
        model(ids)
    n, k = ids.numel(), model.config.moe_top_k
    out = torch.zeros(n, model.config.num_hidden_layers, k, dtype=torch.int16)
    for moe in moe_layers(model):
        out[:, moe.layer_idx] = moe.last_routing.topk_ids.to(torch.int16)
    return out


def test_replaying_another_routing_gives_that_routing_and_own_weights():
    trainer = _model()
    engine = copy.deepcopy(trainer)
    with torch.no_grad():
        for moe in moe_layers(engine):
            moe.router_bias.normal_(0, 1.0)  # another selection, the same weights
    ids = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(1))
    routed = _record(engine, ids)
    own = trainer(ids).logits
    engine_logits = engine(ids).logits
    assert not torch.allclose(own, engine_logits, atol=1e-4)  # the routings really differ
    with replay_routing(trainer, routed):
        replayed = trainer(ids).logits
    torch.testing.assert_close(replayed, engine_logits, atol=1e-6, rtol=1e-5)
    from mispo.models.step3p5.moe_utils import routing_stats
    flips = routing_stats(trainer)["moe/replay_mismatch"]  # the drift replay removed, made visible
    assert 0 < flips <= 1
    with replay_routing(trainer, _record(trainer, ids)):
        trainer(ids)
    assert routing_stats(trainer)["moe/replay_mismatch"] == 0.0
    assert all(m.replay_ids is None for m in moe_layers(trainer))  # the context restores free routing
    torch.testing.assert_close(trainer(ids).logits, own)


def test_replaying_its_own_routing_changes_nothing_and_the_router_still_learns():
    model = _model()
    ids = torch.randint(0, 40, (1, 24), generator=torch.Generator().manual_seed(2))
    routed = _record(model, ids)
    model(ids, labels=ids).loss.backward()
    free = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with replay_routing(model, routed):
        model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, free[n], atol=1e-6, rtol=1e-5)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("moe.gate.weight"))


def test_rows_without_a_record_route_freely():
    trainer = _model()
    engine = copy.deepcopy(trainer)
    with torch.no_grad():
        for moe in moe_layers(engine):
            moe.router_bias.normal_(0, 1.0)
    ids = torch.randint(0, 40, (1, 20), generator=torch.Generator().manual_seed(3))
    routed = _record(engine, ids)
    routed[10:] = -1  # e.g. the tokens the engine never forwarded
    with replay_routing(trainer, routed):
        mixed = trainer(ids).logits
    torch.testing.assert_close(mixed[:, :10], engine(ids).logits[:, :10], atol=1e-6, rtol=1e-5)  # causal
    assert not torch.allclose(mixed[:, 10:], engine(ids).logits[:, 10:], atol=1e-4)


def test_packing_lays_records_end_to_end_and_pads_with_minus_one():
    rec = torch.arange(2 * 4 * 2, dtype=torch.int16).reshape(2, 4, 2) % 8
    a = Sample([1, 2], [3], [0.0], [1], "stop", routed_experts=rec.numpy())  # engine skipped the last token
    b = Sample([4], [5, 6], [0.0, 0.0], [1, 1], "stop")  # no record
    (mb,) = pack_samples([a, b], [0, 1], max_tokens=100)
    assert mb.routed_experts.shape == (6, 4, 2)
    assert torch.equal(mb.routed_experts[:2], rec)
    assert (mb.routed_experts[2:] == -1).all()
    (plain,) = pack_samples([b], [0], max_tokens=100)
    assert plain.routed_experts is None


def test_a_record_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match=r"do not fit a sequence of 3 tokens"):
        routed_rows(torch.zeros(4, 2, 2), 3, 2, 2)
    with pytest.raises(ValueError, match=r"\[<= 5, 3, 2\] expected"):
        routed_rows(torch.zeros(4, 2, 2), 5, 3, 2)


def test_replay_on_a_model_without_step3p5_experts_is_an_error():
    with pytest.raises(ValueError, match="fix: remove rollout.routing_replay"):
        with replay_routing(torch.nn.Linear(2, 2), torch.zeros(1, 1, 1)):
            pass


def test_routing_replay_is_refused_for_a_checkpoint_without_routed_experts(tmp_path):
    import json

    dense = tiny_config(num_hidden_layers=2, hidden_size=32, moe_layers_enum="")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"dense/config.json has no MoE layers"):
        check_replayable(tmp_path / "dense")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"is a 'llama' model"):
        check_replayable(tmp_path / "llama")
    tiny_config(num_hidden_layers=2, hidden_size=32).save_pretrained(tmp_path / "moe")
    check_replayable(tmp_path / "moe")  # layer 1 is MoE: nothing to refuse


def test_routing_replay_is_refused_where_nothing_records_it():
    """CPU runs record it in mispo's Step3p5 vLLM model (tests/rollout/test_routing_record_cpu.py); multi-turn
    episodes are refused everywhere; on GPU vLLM records it."""
    from mispo.config import Recipe
    from mispo.config import RolloutConfig
    from mispo.rollout.vllm_engine import engine_kwargs

    assert Recipe(rollout={"routing_replay": True}).rollout.routing_replay  # a CPU run
    with pytest.raises(ValueError, match="routing_replay covers single-turn"):
        Recipe(rollout={"routing_replay": True, "environment": "x:Y"},
               resources={"gpus_per_node": 8, "actor_gpus": 4, "rollout_gpus": 4})
    with pytest.raises(ValueError, match="engine_kwargs.enable_return_routed_experts is set by rollout.routing_replay"):
        RolloutConfig(engine_kwargs={"enable_return_routed_experts": True})
    assert engine_kwargs("m", RolloutConfig(routing_replay=True), "bfloat16", 0, cpu=False)[
        "enable_return_routed_experts"] is True
    assert "enable_return_routed_experts" not in engine_kwargs("m", RolloutConfig(), "bfloat16", 0, cpu=False)
