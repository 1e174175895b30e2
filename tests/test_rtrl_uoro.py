"""RTRL is exact online; UORO is unbiased (and its broken variants are caught)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from systems import (
    LinearQuadratic,
    check_biased,
    check_unbiased,
    exact_gradient,
    flat,
    replicate_estimates,
    theta_dict,
)

import pes
from pes.estimators._particles import tmap
from pes.system import tree_shapes_match
from pes.tasks import InfluenceBalancing

R = 200  # independent replicates per statistical test
class DictStateLQ(LinearQuadratic):
    """LinearQuadratic with its state split into a dict of leaves of shapes () and (1,)."""

    def init(self, key):
        s = super().init(key)
        return {"x": s[0], "y": s[1:]}

    def step(self, state, theta, t, key):
        s, loss = super().step(jnp.concatenate([state["x"][None], state["y"]]), theta, t, key)
        return {"x": s[0], "y": s[1:]}, loss


class IntStateLQ(LinearQuadratic):
    def init(self, key):
        return {"s": super().init(key), "count": jnp.zeros((), jnp.int32)}


class SometimesNaN(LinearQuadratic):
    """The loss at t = 3 is NaN for particles whose init drew ``bad`` = 1 (kept in the state)."""

    def init(self, key):
        k_s, k_bad = jax.random.split(key)
        return {"s": super().init(k_s), "bad": (jax.random.normal(k_bad) > 0).astype(jnp.float32)}

    def step(self, state, theta, t, key):
        s, loss = super().step(state["s"], theta, t, key)
        loss = jnp.where((t == 3) & (state["bad"] > 0), jnp.nan, loss)
        return {"s": s, "bad": state["bad"]}, loss


class SignlessUORO(pes.UORO):
    """Broken on purpose: nu = ones, so E[nu nu^T] != I."""

    def random_signs(self, key, like):
        return tmap(jnp.ones_like, like)


class NoResetUORO(pes.UORO):
    """Broken on purpose: keeps the old episode's sensitivity after a reset."""

    def fresh_sensitivity(self, sens):
        return sens


@pytest.fixture(scope="module")
def theta():
    return theta_dict()


def allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(flat(a), flat(b), rtol=rtol, atol=atol)


def test_rtrl_is_the_exact_online_gradient_on_influence_balancing():
    task, th = InfluenceBalancing(), jnp.array(0.5)
    unroll_n = lambda t, n: pes.unroll(task, t, jax.random.PRNGKey(0), n)
    est = pes.RTRL(task, truncation_length=1)
    state = est.init(jax.random.PRNGKey(0), th)
    for n in range(1, 101):
        grad, state, info = est.estimate(state, th, jax.random.PRNGKey(n))
        if n in (1, 10, 100):
            loss, ref = jax.value_and_grad(lambda t, n=n: unroll_n(t, n)[1][-1])(th)
            np.testing.assert_allclose(grad, ref, rtol=1e-5)
            np.testing.assert_allclose(info.loss, loss, rtol=1e-5)
            assert int(info.inner_steps) == 1
            # The carried sensitivity is ds_n/dtheta of the n-step unroll, never truncated.
            jac = jax.jacfwd(lambda t, n=n: unroll_n(t, n)[0])(th)
            np.testing.assert_allclose(state.noise[0, :, 0], jac, rtol=1e-5, atol=1e-6)


def test_rtrl_lockstep_full_episode_equals_full_bptt(theta):
    system = LinearQuadratic(horizon=5)
    rtrl = pes.RTRL(system, num_particles=3, truncation_length=5, stagger=False)
    bptt = pes.FullBPTT(system, num_particles=3)
    k_init = jax.random.PRNGKey(1)
    s_r, s_b = rtrl.init(k_init, theta), bptt.init(k_init, theta)
    for w in range(2):  # the second window starts from the reset states, J = 0
        key = jax.random.PRNGKey(10 + w)
        g_r, s_r, i_r = rtrl.estimate(s_r, theta, key)
        g_b, s_b, i_b = bptt.estimate(s_b, theta, key)
        allclose(g_r, g_b)
        np.testing.assert_allclose(i_r.loss, i_b.loss, rtol=1e-6)
        assert int(i_r.inner_steps) == int(i_b.inner_steps) == 15


@pytest.mark.parametrize("system_cls", [LinearQuadratic, DictStateLQ])
def test_rtrl_windows_of_one_episode_sum_to_the_exact_gradient(theta, system_cls):
    # K = 1 < T = 5 in lockstep: TBPTT would be biased, RTRL carries J across windows.
    system = system_cls(horizon=5, noise=0.0)
    est = pes.RTRL(system, num_particles=2, truncation_length=1, stagger=False)
    state = est.init(jax.random.PRNGKey(0), theta)
    grads = []
    for w in range(5):
        g, state, _ = est.estimate(state, theta, jax.random.PRNGKey(w))
        assert tree_shapes_match(g, theta)
        grads.append(flat(g))
    np.testing.assert_allclose(np.mean(grads, 0), flat(exact_gradient(system, theta)),
                               rtol=1e-5, atol=1e-5)


def test_rtrl_staggered_is_unbiased(theta):
    system = LinearQuadratic(horizon=5)
    est = pes.RTRL(system, num_particles=16, truncation_length=2)
    check_unbiased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


@pytest.mark.parametrize("K", [2, 7])
def test_uoro_staggered_is_unbiased(theta, K):
    # K = 7 > T: windows hold resets, where the sensitivity restarts at zero.
    system = LinearQuadratic(horizon=5)
    est = pes.UORO(system, num_particles=256, truncation_length=K)
    check_unbiased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


def test_uoro_lockstep_cycle_is_unbiased_on_dict_state(theta):
    system = DictStateLQ(horizon=5)
    est = pes.UORO(system, num_particles=256, truncation_length=1, stagger=False)
    check_unbiased(replicate_estimates(est, theta, R, windows=5), exact_gradient(system, theta))


@pytest.mark.parametrize("broken", [SignlessUORO, NoResetUORO])
def test_broken_uoro_is_caught(theta, broken):
    system = LinearQuadratic(horizon=5)
    est = broken(system, num_particles=256, truncation_length=2)
    check_biased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


@pytest.mark.parametrize("cls", [pes.RTRL, pes.UORO])
def test_state_layout_and_info(theta, cls):
    est = cls(LinearQuadratic(horizon=5), num_particles=4, truncation_length=3)
    state = est.init(jax.random.PRNGKey(0), theta)
    assert jax.tree_util.tree_leaves(state.inner)[0].shape == (4, 1, 2)
    assert state.t.shape == (4,)
    burn_in = int(state.pending_steps)
    grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(1))
    assert int(info.inner_steps) == 4 * 3 + burn_in
    assert np.isfinite(flat(grad)).all() and np.isfinite(info.loss)
    assert int(state.pending_steps) == 0


@pytest.mark.parametrize("cls", [pes.RTRL, pes.UORO])
@pytest.mark.parametrize("field", ["num_particles", "truncation_length"])
def test_bad_arguments_name_the_field(cls, field):
    with pytest.raises(ValueError, match=field):
        cls(LinearQuadratic(), **{field: 0})
    with pytest.raises(TypeError, match=field):
        cls(LinearQuadratic(), **{field: 1.5})


@pytest.mark.parametrize("cls", [pes.RTRL, pes.UORO])
def test_integer_state_is_rejected(theta, cls):
    est = cls(IntStateLQ(), num_particles=2)
    with pytest.raises(TypeError, match=r"state\['count'\]"):
        est.init(jax.random.PRNGKey(0), theta)


@pytest.mark.parametrize("cls", [pes.RTRL, pes.UORO])
def test_nonfinite_particles_are_left_out_and_named(theta, cls):
    est = cls(SometimesNaN(horizon=10), num_particles=16, truncation_length=5, stagger=False)
    state = est.init(jax.random.PRNGKey(0), theta)
    bad = np.asarray(state.inner["bad"][:, 0]) > 0
    assert 0 < bad.sum() < 16
    grad, _, info = est.estimate(state, theta, jax.random.PRNGKey(1))
    assert np.isfinite(flat(grad)).all() and np.isfinite(info.loss)
    assert int(info.num_nonfinite) == bad.sum()
    assert int(info.nonfinite_particle) == np.argmax(bad)
    assert int(info.nonfinite_step) == 3
