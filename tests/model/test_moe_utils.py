"""MoE helpers: EP-group balance loss, loss-free bias update, router freezing, routing statistics."""

import torch

from mispo.models.step3p5 import Step3p5ForCausalLM
from mispo.models.step3p5.modeling_step3p5 import Routing
from mispo.models.step3p5.moe_utils import (ep_group_balance_loss, expert_load, freeze_router, moe_layers,
                                            model_balance_loss, routing_stats, update_router_bias)
from mispo.models.step3p5.tiny import tiny_config


def _routing(scores, ids):
    return Routing(scores=scores, topk_ids=ids, topk_weights=torch.ones_like(ids, dtype=torch.float))


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
    e, k = 8, 2
    ids = torch.arange(e).view(-1, k).repeat(4, 1)  # each expert chosen equally often
    balanced = ep_group_balance_loss(_routing(torch.full((ids.shape[0], e), 0.5), ids), num_groups=4)
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    scores = torch.full((16, e), 0.1)
    scores[:, :2] = 0.9
    skewed = ep_group_balance_loss(_routing(scores, torch.tensor([[0, 1]] * 16)), num_groups=4)
    # group 0 gets all selections (f=1) and p = 1.8 / 2.4 of the mass: G * f * p = 4 * 0.75
    torch.testing.assert_close(skewed, torch.tensor(3.0))


def test_balance_loss_gradient_reaches_router():
    torch.manual_seed(0)
    model = Step3p5ForCausalLM(tiny_config())
    model(torch.randint(0, 90, (2, 16)))
    model_balance_loss(model, num_groups=2).backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in moe_layers(model))


def test_bias_update_moves_toward_balance():
    torch.manual_seed(0)
    model = Step3p5ForCausalLM(tiny_config())
    model(torch.randint(0, 90, (2, 32)))
    layer = moe_layers(model)[0]
    load = expert_load(layer.last_routing, 8)
    update_router_bias(model, rate=0.01)
    expect = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router_bias, expect)


def test_freeze_router_and_stats():
    torch.manual_seed(0)
    model = Step3p5ForCausalLM(tiny_config())
    assert freeze_router(model) == len(moe_layers(model)) > 0
    assert not any(m.gate.weight.requires_grad for m in moe_layers(model))
    model(torch.randint(0, 90, (2, 16)))
    stats = routing_stats(model)
    assert 0 < stats["moe/routing_confidence"] <= 1
    assert stats["moe/load_max_over_mean"] >= 1
    r = moe_layers(model)[0].last_routing
    probs = r.scores / r.scores.sum(-1, keepdim=True)
    assert probs.gather(-1, r.topk_ids).sum(-1).mean() <= 1
