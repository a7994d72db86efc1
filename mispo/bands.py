"""MIS-PO's bands: the report's values, written once, and `Bands`, the one type every reader of them takes
(torch-free: the recipe schema imports it).

    token band:      0.5   <= x_t    <= 2.0     x_t = pi_old / pi_rollout per token
    trajectory band: 0.996 <= rho    <= 1.001   rho = exp(mean_t log x_t) per trajectory

    bands = recipe.algorithm.bands                       # built once from the recipe's algorithm: section
    result = bands.masks(logp_old, logp_rollout, mask)   # token_keep [B, T], traj_keep [B] (mispo.algorithms.filters)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

TOKEN_BAND = (0.5, 2.0)
TRAJ_BAND = (0.996, 1.001)


@dataclass(frozen=True)
class Bands:
    """token: lo <= x_t <= hi keeps a token; traj: lo <= rho <= hi keeps a trajectory; rho averages log x_t over
    every response token (traj_stat_includes_rejected) or over the token band's kept ones."""

    token: tuple[float, float] = TOKEN_BAND
    traj: tuple[float, float] = TRAJ_BAND
    traj_stat_includes_rejected: bool = True

    def __post_init__(self) -> None:
        for name, field in (("token_bounds", "token"), ("traj_bounds", "traj")):
            object.__setattr__(self, field, checked_band(name, getattr(self, field)))

    def with_traj(self, traj: tuple[float, float]) -> "Bands":
        """The same bands with another trajectory band (the adaptive band's choice for one step)."""
        return replace(self, traj=tuple(traj))

    def masks(self, logp_old, logp_rollout, mask):
        """MIS-PO's filters with these bands: a `mispo.algorithms.filters.MISFilterResult`."""
        from mispo.algorithms.filters import mis_filter_detailed

        return mis_filter_detailed(logp_old, logp_rollout, mask, self.token, self.traj, self.traj_stat_includes_rejected)


def checked_band(name: str, bounds) -> tuple[float, float]:
    """`bounds` as a (lo, hi) pair of floats with 0 <= lo <= hi and lo finite, else a ValueError naming `name`."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) of numbers, got {bounds!r}") from None
    if not (0.0 <= lo <= hi) or math.isinf(lo):
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi with lo finite, got {bounds!r}")
    return lo, hi
