"""Full-episode ES: every estimate is one whole episode from a fresh state.

    g = mean_pairs sum_{t<T} (l+_t - l-_t) eps / (2 sigma^2 T),  eps ~ N(0, sigma^2 I).

Unbiased for the smoothed meta-objective, one estimate per T inner steps per particle. It is
PES with K = T and all pairs in lockstep: each window starts at t = 0 with an empty accumulator.

Termination: a member that returns ``done`` waits (frozen, loss 0, no inner steps counted) for
the rest of the window; E[g] is exactly the gradient of the smoothed
L(theta) = E[sum_{t<tau} l_t] / T.
"""

from __future__ import annotations

from pes.estimators._window import check_reset
from pes.estimators.pes import PES


class FullES(PES):
    """ES over whole episodes; the system must have a finite horizon.

    Args:
      system, num_particles, sigma, antithetic, normalize_losses, centered_ranks, top_b: as
        for PES.
      reset: accepted for uniformity; full ES is the same for "slot" and "pair" (each
        estimate is one episode per member from t = 0).
    """

    def __init__(self, system, *, num_particles, sigma, antithetic=True, normalize_losses=False,
                 centered_ranks=False, top_b=None, mesh=None, reset="slot"):
        # Every window is one slot from t = 0: reset="pair" is accepted (so that one setting
        # serves every estimator) and changes nothing. A pair whose members have all ended
        # waits for the window's end, which calls no simulator once every pair waits.
        check_reset(reset)
        horizon = getattr(system, "horizon", None)
        if hasattr(system, "horizon") and horizon is None:
            raise ValueError(
                "FullES needs a system with a finite horizon; this system never resets "
                "(horizon=None): use PES or TruncatedES with a truncation_length"
            )
        super().__init__(system, num_particles=num_particles, sigma=sigma,
                         truncation_length=horizon if isinstance(horizon, int) else 1,
                         antithetic=antithetic, stagger=False,
                         normalize_losses=normalize_losses, centered_ranks=centered_ranks,
                         top_b=top_b, mesh=mesh)

    def __repr__(self):
        return (f"FullES(num_particles={self.num_particles}, sigma={self.sigma}, "
                f"antithetic={self.antithetic}" + self._ars_repr() + ")")
