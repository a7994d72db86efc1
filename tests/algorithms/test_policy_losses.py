"""Policy losses against direct float64 computations of their formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.algorithms import (
    LOSSES,
    PolicyLossConfig,
    PolicyLossInputs,
    compute_policy_loss,
    get_policy_loss,
    register_policy_loss,
)
from mispo.bands import Bands

ALL = ["mispo", "ppo", "grpo", "gspo", "tis", "icepop", "cispo"]


def make_batch(B=6, T=9, seed=0, gap=0.0, drift=0.0, dtype=torch.float32, seq_adv=False):
    """Random logprobs; gap = spread of log pi_old/pi_rollout, drift = spread of log pi_theta/pi_old."""
    g = torch.Generator().manual_seed(seed)
    old = -4 * torch.rand(B, T, generator=g, dtype=torch.float64)
    roll = old - gap * torch.randn(B, T, generator=g, dtype=torch.float64)
    theta = old + drift * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64) if seq_adv else \
        torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    return dict(theta=theta.to(dtype), old=old.to(dtype), roll=roll.to(dtype), ref=ref.to(dtype),
                adv=adv.to(dtype), mask=mask)


def run(name, b, cfg=None, with_ref=False, **kw):
    logp = b["theta"].clone().requires_grad_(True)
    inp = PolicyLossInputs(logp=logp, logp_old=b["old"], advantages=b["adv"], mask=b["mask"],
                           logp_rollout=b["roll"], logp_ref=b["ref"] if with_ref else None, **kw)
    loss, metrics = compute_policy_loss(name, inp, cfg)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def vanilla_pg(b):
    """L = -sum(m * logp * A) / sum(m), by hand in float64."""
    logp = b["theta"].double().clone().requires_grad_(True)
    adv = b["adv"].double()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    m = b["mask"].double()
    loss = -(m * logp * adv).sum() / m.sum()
    loss.backward()
    return loss.detach(), logp.grad


@pytest.mark.parametrize("name", ALL)
def test_on_policy_every_loss_is_the_vanilla_policy_gradient(name):
    """pi_theta == pi_old == pi_rollout: all filters keep, all ratios are 1."""
    b = make_batch(seed=1, seq_adv=(name == "gspo"))
    b["theta"], b["roll"] = b["old"].clone(), b["old"].clone()
    loss, grad, metrics = run(name, b)
    ref_loss, ref_grad = vanilla_pg(b)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    if name in ("mispo", "cispo"):
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    if name == "mispo":
        assert metrics["mispo/token_keep_frac"] == 1.0 and metrics["mispo/traj_keep_frac"] == 1.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), gap=st.sampled_from([0.0, 0.002, 0.05, 0.5]),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "token-sum-norm"]),
       include=st.booleans())
def test_mispo_matches_definition(seed, gap, agg, include):
    b = make_batch(seed=seed, gap=gap, drift=0.1)
    cfg = PolicyLossConfig(loss_agg=agg, norm_length=11, bands=Bands(traj_stat_includes_rejected=include))
    loss, grad, metrics = run("mispo", b, cfg)
    # direct: x_t, rho, indicator product, aggregation, all in float64 with python loops
    B, T = b["mask"].shape
    theta = b["theta"].double().clone().requires_grad_(True)
    per_row, total, n_tok, n_seq = [], 0.0, 0, 0
    keep_tok = keep_rows = rows = 0
    for i in range(B):
        d = [(b["old"][i, t] - b["roll"][i, t]).item() for t in range(T)]
        m = [bool(b["mask"][i, t]) for t in range(T)]
        tok = [m[t] and 0.5 <= math.exp(d[t]) <= 2.0 for t in range(T)]
        counted = [d[t] for t in range(T) if m[t] and (include or tok[t])]
        traj = bool(counted) and 0.996 <= math.exp(sum(counted) / len(counted)) <= 1.001
        row = sum(-theta[i, t] * b["adv"][i, t].item() for t in range(T) if tok[t] and traj)
        nm = sum(m)
        n_tok += nm
        keep_tok += sum(tok)
        if nm:
            n_seq += 1
            rows += 1
            keep_rows += traj
            per_row.append(row / nm)
        total = total + row
    if agg == "token-mean":
        ref = total / n_tok
    elif agg == "seq-mean-token-mean":
        ref = sum(per_row) / n_seq
    else:
        ref = total / (n_seq * 11)
    ref = ref if torch.is_tensor(ref) else torch.tensor(float(ref), dtype=torch.float64, requires_grad=True)
    ref.backward()
    ref_grad = theta.grad if theta.grad is not None else torch.zeros_like(theta)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    assert metrics["mispo/token_keep_frac"].item() == pytest.approx(keep_tok / n_tok)
    assert metrics["mispo/traj_keep_frac"].item() == pytest.approx(keep_rows / rows)


def ppo_objective_ref(theta, old, adv, m, eps_l=0.2, eps_h=0.2, c=3.0, weight=None):
    """Textbook form: J = min(rA, clip(r)A); dual clip for A < 0: J = max(J, cA). Loss = -mean J."""
    r = torch.exp(theta - old)
    j = torch.min(r * adv, torch.clamp(r, 1 - eps_l, 1 + eps_h) * adv)
    if c is not None:
        j = torch.where(adv < 0, torch.max(j, c * adv), j)
    if weight is not None:
        j = j * weight
    mf = m.double()
    return -(j * mf).sum() / mf.sum()


def _ref_grad(fn, b):
    theta = b["theta"].double().clone().requires_grad_(True)
    loss = fn(theta)
    loss.backward()
    return loss.detach(), theta.grad


@pytest.mark.parametrize("dual", [3.0, None])
@pytest.mark.parametrize("seed", range(4))
def test_ppo_clip_matches_textbook(seed, dual):
    b = make_batch(seed=seed, drift=0.4)
    b["adv"] = b["adv"] * 3
    cfg = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=dual)
    loss, grad, metrics = run("ppo", b, cfg)
    ref_loss, ref_grad = _ref_grad(
        lambda th: ppo_objective_ref(th, b["old"], b["adv"], b["mask"], 0.2, 0.28, dual), b)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    assert 0 < metrics["ppo/clip_frac"] < 1
    _, grad_grpo, _ = run("grpo", b, cfg)
    assert torch.equal(grad, grad_grpo)


def test_dual_clip_bounds_negative_advantage_loss():
    b = make_batch(seed=5)
    b["theta"] = b["old"] + 3.0  # r = e^3 > c = 3
    b["adv"] = -torch.ones_like(b["adv"])
    loss, grad, metrics = run("ppo", b, PolicyLossConfig(dual_clip_c=3.0))
    assert loss.item() == pytest.approx(3.0, rel=1e-6)
    assert grad.abs().max() == 0 and metrics["ppo/dual_clip_frac"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_gspo_matches_sequence_level_definition(seed):
    b = make_batch(seed=seed, drift=0.003, seq_adv=True)
    cfg = PolicyLossConfig(loss_agg="seq-mean-token-mean")

    def ref(theta):
        m = b["mask"].double()
        s = torch.exp(((theta - b["old"]) * m).sum(1) / m.sum(1))  # sequence ratio, grad through all tokens
        a = b["adv"]
        j = torch.min(s * a, torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * a)
        return -j[m.sum(1) > 0].mean()

    loss, grad, metrics = run("gspo", b, cfg)
    ref_loss, ref_grad = _ref_grad(ref, b)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    assert 0 < metrics["gspo/clip_frac"] < 1  # the test must exercise the clip


@pytest.mark.parametrize("seed", range(3))
def test_tis_icepop_cispo_match_definitions(seed):
    b = make_batch(seed=seed, gap=0.8, drift=0.3)
    old, roll, adv, m = b["old"], b["roll"], b["adv"], b["mask"]
    x = torch.exp(old - roll)

    _, grad, met = run("tis", b)
    ref_loss, ref_grad = _ref_grad(
        lambda th: ppo_objective_ref(th, old, adv, m, weight=torch.clamp(x, max=2.0)), b)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    assert 0 < met["tis/capped_frac"] < 1

    w = torch.where((x >= 0.5) & (x <= 5.0), x, torch.zeros_like(x))
    loss, grad, met = run("icepop", b)
    ref_loss, ref_grad = _ref_grad(lambda th: ppo_objective_ref(th, old, adv, m, weight=w), b)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    assert 0 < met["icepop/keep_frac"] < 1

    def cispo_ref(th):
        r = torch.exp(th - old).detach()
        wt = torch.clamp(r, max=1.28)
        return -(wt * adv * th * m.double()).sum() / m.double().sum()

    loss, grad, met = run("cispo", b)
    ref_loss, ref_grad = _ref_grad(cispo_ref, b)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)
    assert 0 < met["cispo/clip_frac"] < 1


def _pad(b, extra_t=3, extra_b=2):
    """Append masked-out columns and rows full of garbage."""
    out = {}
    B, T = b["mask"].shape
    for k, v in b.items():
        if k == "mask":
            p = torch.zeros(B + extra_b, T + extra_t, dtype=torch.bool)
            p[:B, :T] = v
        elif v.dim() == 1:
            p = torch.cat([v, torch.full((extra_b,), float("nan"), dtype=v.dtype)])
        else:
            p = torch.full((B + extra_b, T + extra_t), float("nan"), dtype=v.dtype)
            p[:, T:T + 1] = float("-inf")
            p[B:, :1] = float("inf")
            p[:B, :T] = v
        out[k] = p
    return out


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum-norm"])
@pytest.mark.parametrize("name", ALL)
def test_padding_invariance(name, agg):
    b = make_batch(seed=7, gap=0.05, drift=0.2)
    cfg = PolicyLossConfig(loss_agg=agg, norm_length=16, kl_coef=0.01, entropy_coef=0.0,
                           bands=Bands(traj=(0.9, 1.1)))
    loss, grad, metrics = run(name, b, cfg, with_ref=True)
    ploss, pgrad, pmetrics = run(name, _pad(b), cfg, with_ref=True)
    B, T = b["mask"].shape
    assert torch.isfinite(ploss) and torch.isfinite(pgrad).all()
    assert ploss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(pgrad[:B, :T], grad, rtol=1e-5, atol=1e-8)
    assert pgrad[B:].abs().max() == 0 and pgrad[:, T:].abs().max() == 0
    for k, v in metrics.items():
        assert pmetrics[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_gives_zero_loss_and_gradient(name):
    b = make_batch(seed=8, gap=0.1, drift=0.1)
    b["mask"] = torch.zeros_like(b["mask"])
    loss, grad, metrics = run(name, _pad(b), PolicyLossConfig(kl_coef=0.1), with_ref=True)
    assert loss.item() == 0.0 and grad.abs().max() == 0
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum-norm"])
def test_mispo_all_rejected_gives_zero_loss_and_gradient(agg):
    b = make_batch(seed=9, gap=0.0)
    b["roll"] = b["old"] - 1.0  # x = e: every token outside [0.5, 2]
    loss, grad, metrics = run("mispo", _pad(b), PolicyLossConfig(loss_agg=agg, kl_coef=0.1), with_ref=True)
    assert loss.item() == 0.0 and grad.abs().max() == 0 and not torch.isnan(grad).any()
    assert metrics["mispo/token_keep_frac"] == 0 and metrics["mispo/traj_keep_frac"] == 0
    b["roll"] = b["old"] - 0.01  # tokens pass, every trajectory fails the [0.996, 1.001] band
    loss, grad, metrics = run("mispo", b)
    assert loss.item() == 0.0 and grad.abs().max() == 0
    assert metrics["mispo/token_keep_frac"] == 1 and metrics["mispo/traj_keep_frac"] == 0


def test_mispo_rejected_samples_shrink_the_step():
    """Default token-mean divides by all response tokens, kept or not."""
    b = make_batch(seed=10)
    b["roll"] = b["old"].clone()
    b["roll"][:3] -= 0.01  # reject the first three rows
    _, grad, _ = run("mispo", b)
    full = dict(b, roll=b["old"].clone())
    _, grad_full, _ = run("mispo", full)
    assert grad[:3].abs().max() == 0
    assert torch.allclose(grad[3:], grad_full[3:])


def test_mispo_precomputed_masks_are_used():
    b = make_batch(seed=11)
    B, T = b["mask"].shape
    tk = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) > 0.5
    jk = torch.tensor([True, False] * (B // 2))
    _, grad, metrics = run("mispo", b, token_keep=tk, traj_keep=jk)
    keep = (tk & jk[:, None] & b["mask"]).double()
    ref = -(keep * b["adv"].double()) / b["mask"].double().sum()
    assert torch.allclose(grad.double(), ref, atol=1e-7)
    assert metrics["mispo/traj_keep_frac"] == 0.5


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs(name):
    b32 = make_batch(seed=12, gap=0.3, drift=0.1, seq_adv=(name == "gspo"))
    b16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in b32.items()}
    b32r = {k: (v.float() if v.is_floating_point() else v) for k, v in b16.items()}  # same values in fp32
    cfg = PolicyLossConfig(bands=Bands(traj=(0.8, 1.25)), kl_coef=0.01)
    loss16, grad16, _ = run(name, b16, cfg, with_ref=True)
    loss32, grad32, _ = run(name, b32r, cfg, with_ref=True)
    assert grad16.dtype == torch.bfloat16 and torch.isfinite(grad16.float()).all()
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grad16.float(), grad32, rtol=1e-2, atol=1e-4)


def test_micro_batches_add_up_with_global_token_count():
    b = make_batch(B=8, seed=13, gap=0.001)
    loss, grad, _ = run("mispo", b)
    n = int(b["mask"].sum())
    parts = []
    for sl in (slice(0, 3), slice(3, 8)):
        part = {k: v[sl] for k, v in b.items()}
        _, g, _ = run("mispo", part, num_tokens=n)
        parts.append(g)
    assert torch.allclose(torch.cat(parts), grad, atol=1e-7)


def test_kl_and_entropy_terms():
    b = make_batch(seed=14, drift=0.2)
    ent = torch.rand_like(b["theta"]).requires_grad_(True)
    cfg = PolicyLossConfig(kl_coef=0.5, kl_estimator="k3", entropy_coef=0.1)
    base, _, _ = run("ppo", b)
    loss, _, metrics = run("ppo", b, cfg, with_ref=True, entropy=ent)
    m = b["mask"].double()
    d = b["ref"].double() - b["theta"].double()
    k3 = ((torch.exp(d) - d - 1) * m).sum() / m.sum()
    h = (ent.double() * m).sum() / m.sum()
    assert loss.item() == pytest.approx(base.item() + 0.5 * k3.item() - 0.1 * h.item(), abs=1e-5)
    assert metrics["actor/kl"].item() == pytest.approx(k3.item(), rel=1e-5)
    assert metrics["actor/entropy"].item() == pytest.approx(h.item(), rel=1e-5)
    assert ent.grad is not None
    with pytest.raises(ValueError, match="logp_ref"):
        run("ppo", b, PolicyLossConfig(kl_coef=0.1))


def test_registry_config_and_input_validation():
    assert set(ALL) <= set(LOSSES)
    assert get_policy_loss("grpo") is get_policy_loss("ppo")
    with pytest.raises(ValueError, match="known"):
        get_policy_loss("nope")

    @register_policy_loss("my_loss")
    def my_loss(inputs, config):
        return inputs.logp.sum() * 0, {}

    assert get_policy_loss("my_loss") is my_loss
    LOSSES.pop("my_loss")
    with pytest.raises(ValueError, match="loss_agg"):
        PolicyLossConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        PolicyLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossConfig(dual_clip_c=0.5)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        PolicyLossInputs(x, x, torch.zeros(3), x.bool())
    with pytest.raises(ValueError, match="logp_rollout"):
        compute_policy_loss("mispo", PolicyLossInputs(x, x, x, x.bool()))
    with pytest.raises(ValueError, match="logp_rollout"):
        compute_policy_loss("tis", PolicyLossInputs(x, x, x, x.bool()))
