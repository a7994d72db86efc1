"""The report's MIS-PO bands, written once (torch-free: the recipe schema and the losses both read them).

    token band:      0.5   <= x_t    <= 2.0     x_t = pi_old / pi_rollout per token
    trajectory band: 0.996 <= rho    <= 1.001   rho = exp(mean_t log x_t) per trajectory
"""

TOKEN_BAND = (0.5, 2.0)
TRAJ_BAND = (0.996, 1.001)
