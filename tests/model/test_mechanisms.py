"""Each Step3p5 mechanism against a direct computation written independently in the test."""

import math

import pytest
import torch
import torch.nn.functional as F

from mispo.models.step3p5 import SequenceLayout, Step3p5ForCausalLM
from mispo.models.step3p5.reference_ops import masked_attention, segment_attention, torch_attention, torch_experts
from mispo.models.step3p5.modeling_step3p5 import (Step3p5Attention, Step3p5MoE, ZeroCenteredRMSNorm,
                                                   apply_rope, rope_inv_freq)
from mispo.models.step3p5.tiny import tiny_config


def naive_attention(q, k, v, window, scale, segments=None):
    """Loop over queries: key j visible when j <= i, same segment, and i - j < window."""
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                keys = [j for j in range(i + 1)
                        if (window is None or i - j < window)
                        and (segments is None or segments[bi][j] == segments[bi][i])]
                kk = k[bi, keys, h // group]
                vv = v[bi, keys, h // group]
                w = torch.softmax((kk @ q[bi, i, h]) * scale, dim=0)
                out[bi, i, h] = w @ vv
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 5])
def test_window_semantics_q_minus_k_below_w(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    layout = SequenceLayout.build((2, 9), q.device)
    got = torch_attention(q, k, v, layout, window, 8 ** -0.5)
    torch.testing.assert_close(got, naive_attention(q, k, v, window, 8 ** -0.5), atol=1e-5, rtol=1e-5)


def test_window_one_sees_only_itself():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    got = torch_attention(q, k, v, SequenceLayout.build((1, 6), q.device), 1, 0.5)
    torch.testing.assert_close(got, v)


def test_packed_attention_stays_inside_each_sequence():
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    q, k, v = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4)
    layout = SequenceLayout.build((1, 9), q.device, position_ids=pos)
    assert layout.cu_seqlens.tolist() == [0, 4, 7, 9]
    seg = [[0, 0, 0, 0, 1, 1, 1, 2, 2]]
    got = torch_attention(q, k, v, layout, 2, 0.5)
    torch.testing.assert_close(got, naive_attention(q, k, v, 2, 0.5, seg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 2, 4, 20, 64])  # 20: causal for short groups, windowed for long
def test_segment_attention_matches_the_mask_and_its_gradients(window):
    torch.manual_seed(0)
    lens = [5, 1, 3, 7, 2, 17, 40]  # three padded-length groups: 16, 32, 64
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    seg = [sum(([i] * n for i, n in enumerate(lens)), [])]
    q, k, v = (torch.randn(1, sum(lens), h, 4, requires_grad=True) for h in (4, 2, 2))
    layout = SequenceLayout.build((1, sum(lens)), q.device, position_ids=pos)
    got = segment_attention(q, k, v, layout.cu_seqlens, window, 0.5)
    torch.testing.assert_close(got, naive_attention(q, k, v, window, 0.5, seg), atol=1e-5, rtol=1e-5)
    ref = masked_attention(q, k, v, layout, window, 0.5)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_segment_attention_runs_short_bf16_groups_in_fp32_on_cpu():
    from mispo.ops.segment_attention import CPU_FP32_ATTENTION_BELOW

    torch.manual_seed(0)
    short, long = 9, CPU_FP32_ATTENTION_BELOW + 8
    lens = [short, long, short - 2]
    cu = torch.tensor([0, short, short + long, sum(lens)], dtype=torch.int32)
    q, k, v = (torch.randn(1, sum(lens), 2, 8) for _ in range(3))
    bf = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    got = segment_attention(*bf, cu, None, 0.5)
    assert got.dtype == torch.bfloat16
    upcast = segment_attention(*(t.float() for t in bf), cu, None, 0.5).bfloat16()
    rows_short = torch.cat([torch.arange(short), torch.arange(short + long, sum(lens))])
    assert torch.equal(got[0, rows_short], upcast[0, rows_short])  # the short groups: fp32 scores, cast back
    torch.testing.assert_close(got.float(), naive_attention(q, k, v, None, 0.5, [sum(([i] * n for i, n in
                               enumerate(lens)), [])]), atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in bf)


def test_segment_attention_leaves_tokens_outside_the_bounds_at_zero():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 4, requires_grad=True) for _ in range(3))
    cu = torch.tensor([2, 5, 9], dtype=torch.int32)  # tokens 0-1 and 9-11 belong to no sequence
    got = segment_attention(q, k, v, cu, None, 0.5)
    assert got.shape == q.shape and not got[0, :2].any() and not got[0, 9:].any()
    inner = naive_attention(q[:, 2:9], k[:, 2:9], v[:, 2:9], None, 0.5, [[0] * 3 + [1] * 4])
    torch.testing.assert_close(got[:, 2:9], inner, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert not q.grad[0, :2].any() and not q.grad[0, 9:].any() and q.grad[0, 2:9].any()


def test_many_short_packed_sequences_take_the_segment_path(monkeypatch):
    import mispo.models.step3p5.reference_ops as reference_ops

    calls, real = [], reference_ops.segment_attention
    monkeypatch.setattr(reference_ops, "segment_attention", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 128, 2, 4)
    short = SequenceLayout.build((1, 128), q.device, position_ids=torch.arange(4).repeat(32)[None])
    reference_ops.torch_attention(q, q, q, short, None, 0.5)
    assert calls == [1]  # 32 rows padded to 16: 32 * 16^2 < 128^2
    q = q[:, :32]
    one_long = SequenceLayout.build((1, 32), q.device, position_ids=torch.tensor([[0] + list(range(31))]))
    reference_ops.torch_attention(q, q, q, one_long, None, 0.5)
    assert calls == [1]  # lengths [1, 31] pad to 16 and 32: 16^2 + 32^2 > 32^2, so the full mask is cheaper


def test_zero_centered_rmsnorm():
    norm = ZeroCenteredRMSNorm(6, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 6))
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    xf = x.double()
    expect = xf / torch.sqrt((xf ** 2).mean(-1, keepdim=True) + 1e-5) * (1 + norm.weight.double())
    torch.testing.assert_close(norm(x).double(), expect.to(torch.bfloat16).double())


def test_partial_rope_rotates_first_dims_only_neox_style():
    config = tiny_config(head_dim=16)
    spec = config.attention_spec(0)  # full layer, partial factor 0.5
    assert spec.rotary_dim == 8
    inv = rope_inv_freq(spec)
    pos = torch.tensor([[0, 3, 7]])
    ang = pos[..., None].float() * inv
    x = torch.randn(1, 3, 2, 16)
    got = apply_rope(x, ang.cos(), ang.sin(), spec.rotary_dim)
    assert torch.equal(got[..., 8:], x[..., 8:])
    half = 4
    for t in range(3):
        for i in range(half):
            theta = pos[0, t].item() * inv[i].item()
            a, b = x[0, t, :, i], x[0, t, :, i + half]
            torch.testing.assert_close(got[0, t, :, i], a * math.cos(theta) - b * math.sin(theta))
            torch.testing.assert_close(got[0, t, :, i + half], b * math.cos(theta) + a * math.sin(theta))


def test_llama3_scaling_only_on_full_layers():
    config = tiny_config()
    full, swa = config.attention_spec(0), config.attention_spec(1)
    plain = 1.0 / (full.rope_theta ** (torch.arange(0, full.rotary_dim, 2).double() / full.rotary_dim))
    scaled = rope_inv_freq(full).double()
    wavelen = 2 * math.pi / plain
    orig = full.rope_scaling["original_max_position_embeddings"]
    assert torch.allclose(scaled[wavelen < orig / 32], plain[wavelen < orig / 32].to(scaled))
    assert torch.allclose(scaled[wavelen > orig], (plain / 2.0)[wavelen > orig])
    swa_plain = 1.0 / (swa.rope_theta ** (torch.arange(0, swa.rotary_dim, 2).double() / swa.rotary_dim))
    torch.testing.assert_close(rope_inv_freq(swa).double(), swa_plain.float().double())


def test_head_wise_gate_scales_each_head():
    config = tiny_config()
    torch.manual_seed(0)
    attn = Step3p5Attention(config, 1)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 5, config.hidden_size)
    layout = SequenceLayout.build((1, 5), x.device)
    gated = attn(x, layout)
    g = torch.sigmoid(attn.g_proj(x))  # [1, 5, H]
    saved = attn.g_proj
    attn.g_proj = None
    captured = {}
    handle = attn.o_proj.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    attn(x, layout)
    handle.remove()
    attn.g_proj = saved
    heads = captured["in"].view(1, 5, attn.spec.num_heads, attn.spec.head_dim)
    expect = attn.o_proj((heads * g[..., None]).reshape(1, 5, -1))
    torch.testing.assert_close(gated, expect, atol=1e-5, rtol=1e-5)


def test_router_bias_selects_but_does_not_weight():
    config = tiny_config()
    moe = Step3p5MoE(config, 1)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(10, config.hidden_size)
    base = moe.route(x)
    moe.router_bias[5] = 100.0  # forces expert 5 into every token's top-k
    biased = moe.route(x)
    assert (biased.topk_ids == 5).any(-1).all()
    s = torch.sigmoid(x.float() @ moe.gate.weight.float().T)
    for n in range(10):
        ids = biased.topk_ids[n]
        expect = s[n, ids] / s[n, ids].sum() * config.moe_router_scaling_factor
        torch.testing.assert_close(biased.topk_weights[n], expect)
    torch.testing.assert_close(biased.scores, base.scores)


def test_moe_experts_match_per_token_loop_with_clamp():
    torch.manual_seed(0)
    n, h, i, e, k, limit = 12, 8, 6, 5, 2, 0.3
    x = torch.randn(n, h)
    wg, wu, wd = torch.randn(e, i, h), torch.randn(e, i, h), torch.randn(e, h, i)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    w = torch.rand(n, k)
    got = torch_experts(x, ids, w, wg, wu, wd, limit)
    expect = torch.zeros(n, h)
    for t in range(n):
        for slot in range(k):
            ex = ids[t, slot]
            g, u = wg[ex] @ x[t], wu[ex] @ x[t]
            act = torch.minimum(F.silu(g), torch.tensor(limit)) * u.clamp(-limit, limit)
            expect[t] += w[t, slot] * (wd[ex] @ act)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    unclamped = torch_experts(x, ids, w, wg, wu, wd, 0.0)
    assert not torch.allclose(unclamped, got)  # the clamp really bit at this scale


def test_packed_batch_equals_separate_sequences(tiny_checkpoint):
    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    torch.manual_seed(1)
    a, b = torch.randint(0, 90, (1, 21)), torch.randint(0, 90, (1, 13))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
        packed = torch.cat([a, b], 1)
        pos = torch.cat([torch.arange(21), torch.arange(13)])[None]
        lp = model(packed, position_ids=pos).logits
    torch.testing.assert_close(lp[:, :21], la, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lp[:, 21:], lb, atol=2e-5, rtol=1e-4)


def test_left_padding_equals_unpadded(tiny_checkpoint):
    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    torch.manual_seed(2)
    seq = torch.randint(0, 90, (1, 19))
    padded = torch.cat([torch.full((1, 5), 6), seq], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 19)], 1).long()
    with torch.no_grad():
        ref = model(seq).logits
        got = model(padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_gradients_reach_every_trainable_parameter(tiny_checkpoint):
    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 90, (2, 24))
    bias_before = {n: b.clone() for n, b in model.named_buffers() if "router_bias" in n}
    out = model(ids, labels=ids, mtp_weight=0.1)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert bias_before and not any("router_bias" in n for n, _ in model.named_parameters())
    for n, b in model.named_buffers():
        if "router_bias" in n:
            assert torch.equal(b, bias_before[n])


def test_mtp_loss_heads_predict_further_tokens(tiny_checkpoint):
    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 90, (1, 12))
    out = model(ids, labels=ids)
    layout = SequenceLayout.build((1, 12), ids.device)
    losses = model.mtp_losses(ids, out.hidden_states_pre_norm, ids, layout)
    assert len(losses) == model.config.num_nextn_predict_layers
    layer = model.model.mtp_layers[0]
    emb = model.model.embed_tokens(ids)
    next_emb = torch.cat([emb[:, 1:], torch.zeros_like(emb[:, :1])], 1)
    _, logits = layer.predict(next_emb, out.hidden_states_pre_norm, layout)
    expect = F.cross_entropy(logits[0, :10], ids[0, 2:])
    torch.testing.assert_close(losses[0], expect)
