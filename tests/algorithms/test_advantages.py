"""Advantages against plain-Python references."""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.algorithms import (
    advantage_metrics,
    compute_gae,
    group_advantages,
    sequence_to_token,
    whiten_advantages,
)


def gae_reference(rewards, values, mask, gamma, lam, truncated, boot):
    """A_k = sum_{j >= k} (gamma lam)^(j - k) delta_j over the masked tokens of each row (explicit sums)."""
    adv_rows = []
    for b, m_row in enumerate(mask):
        idx = [t for t, m in enumerate(m_row) if m]
        n = len(idx)
        v = [values[b][t] for t in idx]
        if isinstance(rewards[b], list):
            r = [rewards[b][t] for t in idx]
        else:
            r = [0.0] * n
            if n and not truncated[b]:
                r[-1] = rewards[b]
        v_end = (boot[b] if boot is not None else (v[-1] if n else 0.0)) if truncated[b] else 0.0
        v_next = v[1:] + [v_end]
        delta = [r[k] + gamma * v_next[k] - v[k] for k in range(n)]
        a = [sum((gamma * lam) ** (j - k) * delta[j] for j in range(k, n)) for k in range(n)]
        row = [0.0] * len(m_row)
        for k, t in enumerate(idx):
            row[t] = a[k]
        adv_rows.append(row)
    return adv_rows


@st.composite
def gae_case(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    f = st.floats(-2, 2)
    values = [[draw(f) for _ in range(T)] for _ in range(B)]
    mask = [[draw(st.booleans()) for _ in range(T)] for _ in range(B)]
    per_token = draw(st.booleans())
    rewards = [[draw(f) for _ in range(T)] for _ in range(B)] if per_token else [draw(f) for _ in range(B)]
    truncated = [draw(st.booleans()) for _ in range(B)]
    boot = draw(st.one_of(st.none(), st.lists(f, min_size=B, max_size=B)))
    return rewards, values, mask, truncated, boot


@settings(max_examples=150, deadline=None)
@given(case=gae_case(), gamma=st.sampled_from([1.0, 0.99, 0.9, 0.5]),
       lam=st.sampled_from([1.0, 0.95, 0.7, 0.0]))
def test_gae_matches_python_reference(case, gamma, lam):
    rewards, values, mask, truncated, boot = case
    adv, ret = compute_gae(
        torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
        torch.tensor(mask), gamma=gamma, lam=lam, truncated=torch.tensor(truncated),
        bootstrap_value=None if boot is None else torch.tensor(boot))
    ref = gae_reference(rewards, values, mask, gamma, lam, truncated, boot)
    assert torch.allclose(adv.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
    ref_ret = [[ref[b][t] + values[b][t] if mask[b][t] else 0.0 for t in range(len(mask[b]))]
               for b in range(len(mask))]
    assert torch.allclose(ret.double(), torch.tensor(ref_ret, dtype=torch.float64), atol=1e-4)


def test_gamma_lambda_one_is_return_minus_value():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    values = torch.randn(B, T, generator=g)
    values[:, -1] = float("nan")  # padding garbage
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -1] = False
    mask[1, 3] = False  # an environment token in the middle
    mask[4] = False  # an empty row
    R = torch.randn(B, generator=g)
    truncated = torch.tensor([False, False, True, True, False])
    boot = torch.tensor([9.0, 9.0, 5.0, -2.0, 9.0])
    adv, ret = compute_gae(R, values, mask, truncated=truncated, bootstrap_value=boot)
    for b in range(B):
        R_hat = boot[b] if truncated[b] else R[b]  # V(s_T) in place of the reward when cut
        for t in range(T):
            want = (R_hat - values[b, t]).item() if mask[b, t] else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-6)
            assert ret[b, t].item() == pytest.approx(R_hat.item() if mask[b, t] else 0.0, abs=1e-6)
    # without an explicit bootstrap value, a truncated row bootstraps from its last masked value
    adv2, _ = compute_gae(R, values, mask, truncated=truncated)
    assert adv2[2, 5].item() == 0.0
    assert adv2[2, 0].item() == pytest.approx((values[2, 5] - values[2, 0]).item(), abs=1e-6)


def test_truncated_reward_is_ignored_and_untruncated_is_used():
    values = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv, _ = compute_gae(torch.tensor([1.0, 1.0]), values, mask, truncated=torch.tensor([False, True]),
                         bootstrap_value=torch.tensor([0.0, 0.25]))
    assert adv.tolist() == [[1.0, 1.0, 1.0], [0.25, 0.25, 0.25]]


@pytest.mark.parametrize("method", ["grpo", "grpo_no_std", "rloo"])
def test_group_advantages_match_python(method):
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([3, 3, 3, 7, 7, 1, 3, 7, 9, 1])  # unsorted, one singleton group
    r = torch.randn(len(ids), generator=g, dtype=torch.float64)
    adv = group_advantages(r, group_ids=ids, method=method)
    for i in range(len(ids)):
        grp = [r[j].item() for j in range(len(ids)) if ids[j] == ids[i]]
        if len(grp) == 1:
            want = 0.0
        elif method == "grpo":
            want = (r[i].item() - statistics.mean(grp)) / (statistics.stdev(grp) + 1e-6)
        elif method == "grpo_no_std":
            want = r[i].item() - statistics.mean(grp)
        else:
            others = [r[j].item() for j in range(len(ids)) if ids[j] == ids[i] and j != i]
            want = r[i].item() - statistics.mean(others)
        assert adv[i].item() == pytest.approx(want, abs=1e-5)


def test_group_size_and_constant_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv = group_advantages(r, group_size=3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:].tolist() == pytest.approx([-0.57735, 1.1547, -0.57735], abs=1e-4)
    assert torch.equal(group_advantages(r, group_size=3, method="drgrpo"),
                       group_advantages(r, group_size=3, method="grpo_no_std"))
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(r, group_size=4)
    with pytest.raises(ValueError, match="method"):
        group_advantages(r, group_size=3, method="ppo")
    tok = sequence_to_token(adv, torch.tensor([[True, False]] * 6))
    assert tok[:, 1].abs().max() == 0 and torch.equal(tok[:, 0], adv)


def test_whitening_uses_masked_statistics():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, generator=g) * 3 + 2
    mask = torch.rand(4, 6, generator=g) > 0.3
    a_pad = torch.where(mask, a, torch.full_like(a, float("nan")))
    w = whiten_advantages(a_pad, mask)
    sel = a[mask].double()
    want = (sel - sel.mean()) / sel.std()
    assert torch.allclose(w[mask].double(), want, atol=1e-5)
    assert w[~mask].abs().max() == 0
    w2 = whiten_advantages(a_pad, mask, shift_mean=False)
    assert torch.allclose(w2[mask].double(), want + sel.mean(), atol=1e-5)
    m = advantage_metrics(a_pad, mask)
    assert m["adv/mean"].item() == pytest.approx(sel.mean().item(), rel=1e-5)
    assert m["adv/std"].item() == pytest.approx(sel.std().item(), rel=1e-5)
