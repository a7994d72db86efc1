"""KL estimators, critic loss, entropy and log-probs from logits."""

import math

import pytest
import torch

from mispo.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_entropy,
    value_loss,
)


def _dists(V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1) for _ in range(3)]


def test_kl_estimators_match_formulas():
    th, ref, old = _dists()
    for a in range(len(th)):
        t, r, o = th[a].item(), ref[a].item(), old[a].item()
        want = {"k1": t - r, "k2": 0.5 * (t - r) ** 2,
                "k3": math.exp(r - t) - (r - t) - 1,
                "unbiased": math.exp(t - o) * (math.exp(r - t) - (r - t) - 1)}
        for name, w in want.items():
            got = kl_penalty(name, th[a:a + 1], ref[a:a + 1], old[a:a + 1])
            assert got.item() == pytest.approx(w, rel=1e-6, abs=1e-9), name


def test_unbiased_kl_is_unbiased_in_value_and_gradient():
    """E_{a ~ pi_old}[KL_t] = KL(pi_theta || pi_ref), and so is its gradient (exact enumeration)."""
    g = torch.Generator().manual_seed(3)
    th_logits = torch.randn(9, dtype=torch.float64, generator=g).requires_grad_(True)
    _, ref, old = _dists(V=9, seed=4)
    th = torch.log_softmax(th_logits, -1)
    est = (old.exp() * kl_penalty("unbiased", th, ref, old)).sum()
    (g_est,) = torch.autograd.grad(est, th_logits)
    th = torch.log_softmax(th_logits, -1)
    true = (th.exp() * (th - ref)).sum()
    (g_true,) = torch.autograd.grad(true, th_logits)
    assert est.item() == pytest.approx(true.item(), rel=1e-6)
    assert torch.allclose(g_est, g_true, atol=1e-6)
    # k3 is unbiased when sampling from pi_theta itself, k1 likewise
    th = torch.log_softmax(th_logits.detach(), -1)
    for name in ("k1", "k3"):
        assert (th.exp() * kl_penalty(name, th, ref)).sum().item() == pytest.approx(true.item(), rel=1e-6)


def test_kl_mask_and_errors():
    x = torch.tensor([[-1.0, float("nan")]])
    y = torch.tensor([[-2.0, float("-inf")]])
    out = kl_penalty("unbiased", x, y, x, mask=torch.tensor([[True, False]]))
    assert torch.isfinite(out).all() and out[0, 1] == 0
    with pytest.raises(ValueError, match="logp_old"):
        kl_penalty("unbiased", x, y)
    with pytest.raises(ValueError, match="k9"):
        kl_penalty("k9", x, y)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_formula(clip):
    g = torch.Generator().manual_seed(5)
    B, T = 4, 6
    v = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_(True)
    old = v.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    loss, met = value_loss(v, ret, mask, old_values=old, clip_range=clip)
    total, n, clipped = 0.0, 0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            vv, oo, rr = v[b, t].item(), old[b, t].item(), ret[b, t].item()
            e = (vv - rr) ** 2
            if clip is not None:
                vc = oo + min(max(vv - oo, -clip), clip)
                clipped += (vc - rr) ** 2 > e
                e = max(e, (vc - rr) ** 2)
            total += 0.5 * e
            n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    assert met["critic/vf_clip_frac"].item() == pytest.approx(clipped / n)
    assert met["critic/value_mean"].item() == pytest.approx(v.detach()[mask].mean().item(), rel=1e-5)
    loss.backward()
    assert v.grad[~mask].abs().max() == 0
    # critic masking option: rejected tokens drop out, denominator stays all response tokens
    keep = torch.zeros(B, T, dtype=torch.bool)
    loss0, _ = value_loss(v, ret, mask, old_values=old, clip_range=clip, keep_mask=keep)
    assert loss0.item() == 0.0
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, ret, mask, clip_range=0.2)


def test_aggregate_loss_modes():
    l = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(l, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(l, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(l, m, "token-sum-norm", norm_length=5).item() == pytest.approx(10 / (2 * 5))
    assert aggregate_loss(l, m, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    assert aggregate_loss(l, m, "seq-mean-token-mean", num_seqs=4).item() == pytest.approx(6 / 4)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(l, m, "sum")


def test_entropy_and_logprobs_from_logits():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, 11, generator=g)
    logits[0, 0, :4] = float("-inf")  # e.g. a vocabulary mask
    want = torch.distributions.Categorical(logits=logits).entropy()
    for chunk in (1, 4, 1000):
        assert torch.allclose(entropy_from_logits(logits, chunk_size=chunk), want, atol=1e-5)
    mask = torch.rand(3, 5, generator=g) > 0.4
    got = masked_entropy(logits, mask, chunk_size=2).item()
    assert got == pytest.approx(want[mask].mean().item(), rel=1e-5)

    labels = torch.randint(4, 11, (3, 5), generator=g)
    want_lp = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    got_lp = logprobs_from_logits(logits, labels, chunk_size=3, temperature=0.7)
    assert torch.allclose(got_lp, want_lp, atol=1e-5)

    # gradients through the chunked, checkpointed path equal the direct ones; bf16 logits work
    x = torch.randn(2, 4, 13, generator=g).bfloat16().requires_grad_(True)
    lab = labels[:2, :4]
    (entropy_from_logits(x, chunk_size=3).sum() + logprobs_from_logits(x, lab, chunk_size=3).sum()).backward()
    x2 = x.detach().float().requires_grad_(True)
    (torch.distributions.Categorical(logits=x2).entropy().sum()
     + torch.log_softmax(x2, -1).gather(-1, lab[..., None]).sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), x2.grad, atol=2e-2)
