"""Statistical tests: means of many independent estimates against the exact gradient.

On LinearQuadratic the Gaussian-smoothed gradient equals the exact gradient of the mean
per-step loss, so an unbiased estimator's replicate mean must lie within 4.5 standard errors of
``jax.grad`` through a full unroll in every component. Each test also shows it has the power to
see a bias: the same estimates are > 6 standard errors from a reference shifted by 10%.
"""

import jax.numpy as jnp
import pytest
from systems import (
    LinearQuadratic,
    check_biased,
    check_unbiased,
    exact_gradient,
    replicate_estimates,
    theta_dict,
)

import pes
from pes.estimators._particles import select, tmap

R = 200  # independent replicates per test


@pytest.fixture(scope="module")
def theta():
    return theta_dict()


def test_pes_lockstep_whole_cycles(theta):
    # T = 5, K = 2: a cycle of 5 windows covers every step of the episode exactly twice.
    system = LinearQuadratic(horizon=5)
    est = pes.PES(system, num_particles=256, sigma=0.1, truncation_length=2, stagger=False)
    check_unbiased(replicate_estimates(est, theta, R, windows=5), exact_gradient(system, theta))


@pytest.mark.parametrize("K", [2, 3, 7])
def test_pes_staggered_first_estimates(theta, K):
    # K = 7 > T: windows hold whole episodes and several resets.
    system = LinearQuadratic(horizon=5)
    est = pes.PES(system, num_particles=256, sigma=0.1, truncation_length=K)
    check_unbiased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


def test_pes_plain_monte_carlo(theta):
    system = LinearQuadratic(horizon=5)
    est = pes.PES(system, num_particles=256, sigma=0.1, truncation_length=2, antithetic=False)
    check_unbiased(replicate_estimates(est, theta, R, windows=2), exact_gradient(system, theta))


@pytest.mark.parametrize("noise_period", [None, 2])
def test_nres_staggered(theta, noise_period):
    system = LinearQuadratic(horizon=5)
    est = pes.NRES(system, num_particles=256, sigma=0.1, truncation_length=2,
                   noise_period=noise_period)
    check_unbiased(replicate_estimates(est, theta, R, windows=2), exact_gradient(system, theta))


@pytest.mark.parametrize("antithetic", [True, False])
def test_full_es(theta, antithetic):
    system = LinearQuadratic(horizon=5)
    est = pes.FullES(system, num_particles=256, sigma=0.1, antithetic=antithetic)
    check_unbiased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


def test_full_bptt_and_tbptt_at_full_length(theta):
    system = LinearQuadratic(horizon=5)
    exact = exact_gradient(system, theta)
    check_unbiased(replicate_estimates(pes.FullBPTT(system, num_particles=4), theta, R, 1), exact)
    tbptt = pes.TBPTT(system, num_particles=4, truncation_length=5, stagger=False)
    check_unbiased(replicate_estimates(tbptt, theta, R, 1), exact)


def test_truncated_es_k1_is_biased(theta):
    system = LinearQuadratic(horizon=20)
    est = pes.TruncatedES(system, num_particles=256, sigma=0.1, truncation_length=1)
    check_biased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


def test_tbptt_k1_is_biased(theta):
    system = LinearQuadratic(horizon=20)
    est = pes.TBPTT(system, num_particles=4, truncation_length=1)
    check_biased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


class BoundaryBugPES(pes.PES):
    """Broken on purpose: credits the step that ends an episode to the new window's noise."""

    closed_form_credit = False  # run the per-step hooks, with the broken weight below

    def weight(self, noise, done):
        return select(done, noise.eps, tmap(jnp.add, noise.xi, noise.eps))


class ColdBurnInPES(pes.PES):
    """Broken on purpose: burns in at the unperturbed theta with an empty accumulator."""

    def start_burn_in(self, noise, key, theta):
        return noise


class ColdBurnInNRES(pes.NRES):
    """Broken on purpose: burns in at theta, drawing the episode's noise only afterwards."""

    def start_burn_in(self, noise, key, theta):
        return tmap(jnp.zeros_like, noise)

    def end_window(self, noise):
        return noise


@pytest.mark.parametrize("broken", [BoundaryBugPES, ColdBurnInPES])
def test_broken_pes_is_caught(theta, broken):
    system = LinearQuadratic(horizon=5)
    est = broken(system, num_particles=256, sigma=0.1, truncation_length=2)
    check_biased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


def test_broken_nres_is_caught(theta):
    system = LinearQuadratic(horizon=5)
    est = ColdBurnInNRES(system, num_particles=256, sigma=0.1, truncation_length=2)
    check_biased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))
