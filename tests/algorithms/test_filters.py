"""MIS-PO filters against their definitions, computed element by element in Python float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.algorithms import AdaptiveTrajBand, mis_filter, mis_filter_detailed

SLACK = 1e-5  # elements this close (in log space) to a bound are checked by the boundary tests


def ref_filter(lo_old, lo_roll, mask, tb, jb, include_rejected=True):
    """Definition: x = exp(a - b); token keep iff mask and lo <= x <= hi; rho = exp(mean log x)."""
    tok, traj, unsure_tok, unsure_traj = [], [], [], []
    for a_row, b_row, m_row in zip(lo_old, lo_roll, mask):
        d = [float(a) - float(b) for a, b in zip(a_row, b_row)]
        k = [bool(m) and tb[0] <= math.exp(x) <= tb[1] for x, m in zip(d, m_row)]
        tok.append(k)
        unsure_tok.append([bool(m) and min(abs(x - math.log(tb[0])), abs(x - math.log(tb[1]))) < SLACK
                           for x, m in zip(d, m_row)])
        counted = [x for x, m, kk in zip(d, m_row, k) if m and (include_rejected or kk)]
        if not counted:
            traj.append(False)
            unsure_traj.append(False)
            continue
        rho = math.exp(sum(counted) / len(counted))
        traj.append(jb[0] <= rho <= jb[1])
        lr = math.log(rho)
        unsure_traj.append(min(abs(lr - math.log(jb[0])), abs(lr - math.log(jb[1]))) < SLACK)
    return tok, traj, unsure_tok, unsure_traj


@st.composite
def filter_case(draw, small=False):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 8))
    lo, hi = (-0.02, 0.02) if small else (-1.6, 1.6)
    special = [math.log(0.5), math.log(2.0), 0.0]
    deltas = st.one_of(st.floats(lo, hi), st.sampled_from(special))
    roll = [[draw(st.floats(-12.0, 0.0)) for _ in range(T)] for _ in range(B)]
    old = [[r + draw(deltas) for r in row] for row in roll]
    mask = [[draw(st.booleans()) for _ in range(T)] for _ in range(B)]
    return old, roll, mask


def _tensors(old, roll, mask):
    return (torch.tensor(old, dtype=torch.float32), torch.tensor(roll, dtype=torch.float32),
            torch.tensor(mask, dtype=torch.bool))


def _assert_matches(got, want, unsure):
    for g, w, u in zip(got, want, unsure):
        if not u:
            assert g == w


@settings(max_examples=150, deadline=None)
@given(case=filter_case(), tb=st.sampled_from([(0.5, 2.0), (0.8, 1.25), (0.3, 1.0), (1.0, 3.0)]))
def test_token_filter_matches_definition(case, tb):
    old, roll, mask = _tensors(*case)
    token_keep, traj_keep = mis_filter(old, roll, mask, token_bounds=tb)
    # the reference reads the same fp32 numbers the filter reads
    tok, _, unsure, _ = ref_filter(old.tolist(), roll.tolist(), mask.tolist(), tb, (0.996, 1.001))
    assert token_keep.dtype == torch.bool and token_keep.shape == old.shape
    for b in range(old.shape[0]):
        _assert_matches(token_keep[b].tolist(), tok[b], unsure[b])
    assert not token_keep[~mask].any()


@settings(max_examples=150, deadline=None)
@given(case=filter_case(small=True), include=st.booleans(),
       jb=st.sampled_from([(0.996, 1.001), (0.99, 1.01), (0.999, 1.0), (0.98, 1.005)]))
def test_traj_filter_matches_definition(case, include, jb):
    old, roll, mask = _tensors(*case)
    res = mis_filter_detailed(old, roll, mask, (0.995, 1.004), jb, traj_stat_includes_rejected=include)
    _, traj, _, unsure = ref_filter(old.tolist(), roll.tolist(), mask.tolist(), (0.995, 1.004), jb, include)
    assert res.traj_keep.dtype == torch.bool and res.traj_keep.shape == (old.shape[0],)
    _assert_matches(res.traj_keep.tolist(), traj, unsure)
    if include and jb == (0.996, 1.001):
        tk, jk = mis_filter(old, roll, mask, token_bounds=(0.995, 1.004))
        assert torch.equal(jk, res.traj_keep) and torch.equal(tk, res.token_keep)


@pytest.mark.parametrize("bound", [0.5, 2.0, 0.8, 1.25, 0.996, 1.001])
def test_boundaries_are_inclusive(bound):
    """A ratio equal to a bound (up to fp32 rounding of the logprobs) is kept; just outside is not."""
    g = torch.Generator().manual_seed(0)
    roll = -10 * torch.rand(64, 1, generator=g, dtype=torch.float64)
    old = roll + math.log(bound)
    mask = torch.ones(64, 1, dtype=torch.bool)
    tb = (min(bound, 1.0), max(bound, 1.0))
    for o, r in [(old.float(), roll.float()), (old.float().bfloat16().float(), old.float().bfloat16().float()
                                                - math.log(bound))]:
        tk, jk = mis_filter(o, r, mask, token_bounds=tb, traj_bounds=tb)
        assert tk.all() and jk.all()
    outside = math.log(bound) + (1e-4 if bound >= 1 else -1e-4)
    tk, jk = mis_filter((roll + outside).float(), roll.float(), mask, token_bounds=tb, traj_bounds=tb)
    assert not tk.any() and not jk.any()
    # the exact fp32 nearest to log(bound) against 0: the cleanest possible boundary value
    d = torch.tensor([[math.log(bound)]], dtype=torch.float32)
    tk, jk = mis_filter(d, torch.zeros_like(d), torch.ones_like(d, dtype=torch.bool), tb, tb)
    assert tk.all() and jk.all()


def test_empty_rows_and_garbage_padding():
    old = torch.tensor([[-1.0, -2.0, float("nan")], [float("-inf"), float("inf"), float("nan")]])
    roll = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, float("nan"), 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    tk, jk = mis_filter(old, roll, mask)
    assert tk.tolist() == [[True, True, False], [False, False, False]]
    assert jk.tolist() == [True, False]  # a row with nothing to train on is not kept
    res = mis_filter_detailed(old, roll, mask)
    assert torch.isfinite(res.log_rho).all() and torch.isfinite(res.log_ratio).all()


def test_nonfinite_inside_mask_is_rejected():
    old = torch.tensor([[-1.0, float("-inf"), -1.0]])
    roll = torch.tensor([[-1.0, -1.0, float("-inf")]])
    tk, jk = mis_filter(old, roll, torch.ones(1, 3, dtype=torch.bool))
    assert tk.tolist() == [[True, False, False]] and jk.tolist() == [False]


def test_traj_stat_option_counts_only_kept_tokens():
    # one wild token (x = 8) ruins rho over all tokens but not over the kept ones
    old = torch.tensor([[-1.0, -1.0, -1.0 + math.log(8.0), -1.0]])
    roll = torch.full((1, 4), -1.0)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert mis_filter_detailed(old, roll, mask).traj_keep.tolist() == [False]
    res = mis_filter_detailed(old, roll, mask, traj_stat_includes_rejected=False)
    assert res.token_keep.tolist() == [[True, True, False, True]] and res.traj_keep.tolist() == [True]


def test_bf16_inputs_match_fp32_of_the_same_values():
    g = torch.Generator().manual_seed(1)
    roll = (-5 * torch.rand(8, 16, generator=g)).bfloat16()
    old = (roll.float() + 0.6 * torch.randn(8, 16, generator=g)).bfloat16()
    mask = torch.rand(8, 16, generator=g) > 0.2
    tk, jk = mis_filter(old, roll, mask, traj_bounds=(0.8, 1.25))
    tk2, jk2 = mis_filter(old.float(), roll.float(), mask, traj_bounds=(0.8, 1.25))
    assert torch.equal(tk, tk2) and torch.equal(jk, jk2)


def test_bad_bounds_are_rejected():
    x = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="token_bounds"):
        mis_filter(x, x, m, token_bounds=(2.0, 0.5))
    with pytest.raises(ValueError, match="traj_bounds"):
        mis_filter(x, x, m, traj_bounds=(-1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        mis_filter(x, x[:, :1], m)


# ---------------------------------------------------------------------------------- adaptive


def _kept_frac(log_rho, bounds):
    lo, hi = bounds
    return ((log_rho >= math.log(lo)) & (log_rho <= math.log(hi))).float().mean().item()


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("dist", ["normal", "shifted", "heavy"])
def test_adaptive_band_hits_target_keep(target, dist):
    g = torch.Generator().manual_seed(2)

    def batch(n=4096):
        if dist == "normal":
            return 0.01 * torch.randn(n, generator=g)
        if dist == "shifted":
            return 0.004 + 0.02 * torch.randn(n, generator=g)
        return 0.005 * torch.distributions.StudentT(2.0).sample((n,))

    band = AdaptiveTrajBand(target_keep=target, ema_decay=0.8, min_width=1e-5, max_width=10.0)
    for _ in range(30):
        band.update_log_rho(batch())
    assert abs(_kept_frac(batch(), band.bounds) - target) < 0.03
    # shape of the base band is kept: log lo / log hi stays log 0.996 / log 1.001
    lo, hi = band.bounds
    assert math.log(lo) / math.log(hi) == pytest.approx(math.log(0.996) / math.log(1.001), rel=1e-6)

    fresh = AdaptiveTrajBand(target_keep=target, ema_decay=0.0, min_width=1e-5, max_width=10.0)
    x = batch(1000)
    frac = _kept_frac(x, fresh.update_log_rho(x))
    assert target <= frac <= target + 0.005  # "higher" quantile: at least the target passes


def test_adaptive_band_end_to_end_with_mis_filter():
    g = torch.Generator().manual_seed(3)
    B, T = 2048, 12
    roll = -3 * torch.rand(B, T, generator=g)
    old = roll + 0.03 * torch.randn(B, T, generator=g) + 0.01 * torch.randn(B, 1, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    band = AdaptiveTrajBand(target_keep=0.7, ema_decay=0.0, min_width=1e-5)
    bounds = band.update(old, roll, mask)
    _, jk = mis_filter(old, roll, mask, traj_bounds=bounds)
    assert 0.7 <= jk.float().mean().item() <= 0.71
    _, jk_fixed = mis_filter(old, roll, mask)
    assert jk_fixed.float().mean().item() < 0.5  # the report's fixed band is narrower here


def test_adaptive_band_clamps_and_checkpoints():
    base_w = math.log(1.001 / 0.996)
    tight = AdaptiveTrajBand(target_keep=0.9)
    assert tight.bounds == pytest.approx((0.996, 1.001))
    tight.update_log_rho(torch.zeros(100))  # on-policy data never narrows below the base band
    assert tight.bounds == pytest.approx((0.996, 1.001))
    wide = AdaptiveTrajBand(target_keep=0.9, max_width=3 * base_w)
    wide.update_log_rho(torch.randn(100))
    lo, hi = wide.bounds
    assert math.log(hi / lo) == pytest.approx(3 * base_w)

    a = AdaptiveTrajBand(target_keep=0.8, ema_decay=0.5, min_width=1e-6)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        a.update_log_rho(0.01 * torch.randn(64, generator=g))
    b = AdaptiveTrajBand(target_keep=0.8, ema_decay=0.5, min_width=1e-6)
    b.load_state_dict(a.state_dict())
    assert a.bounds == b.bounds
    x = 0.01 * torch.randn(64, generator=g)
    assert a.update_log_rho(x) == b.update_log_rho(x)
    # a batch with no valid rows changes nothing
    before = a.state_dict()
    a.update_log_rho(torch.ones(4), valid=torch.zeros(4, dtype=torch.bool))
    assert a.state_dict() == before
