"""pes.diagnostics on LinearQuadratic (whose smoothed gradient is the exact one), and a tiny
variance study end to end."""

import json

import jax
import numpy as np
import pytest
from systems import LinearQuadratic, exact_gradient, flat, theta_dict

import pes
from pes.diagnostics import Reference, diagnose, reference_gradient, replicate_estimates
from pes.paper.variance_study import (
    VarianceStudyConfig,
    check_claims,
    plot_variance_study,
    run_variance_study,
)
from pes.tasks import InfluenceBalancing

KEY = jax.random.PRNGKey(0)
R = 100


@pytest.fixture(scope="module")
def theta():
    return theta_dict()


@pytest.fixture(scope="module")
def system():
    return LinearQuadratic(horizon=5)


def exact_for(system, theta):
    return jax.jit(lambda th: exact_gradient(system, th))(theta)


@pytest.fixture(scope="module")
def exact(system, theta):
    return exact_for(system, theta)


@pytest.mark.parametrize("method", ["autodiff", "es"])
def test_reference_matches_exact_gradient(system, theta, exact, method):
    ref = reference_gradient(system, theta, KEY, method=method, sigma=0.1, num_samples=128)
    g, se = ref.flat()
    assert ref.method == method and ref.num_steps == 5 and ref.inner_steps == 2 * 128 * 5
    assert np.all(se > 0)
    z = (g - flat(exact)) / se
    assert np.abs(z).max() < 4.5, z
    # autodiff at antithetic perturbations is nearly exact on a linear-quadratic system.
    if method == "autodiff":
        np.testing.assert_allclose(g, flat(exact), rtol=0.02)


def test_pes_unbiased(system, theta, exact):
    # The variance study's estimate: the T/K windows of one episode in lockstep, averaged.
    est = pes.PES(system, num_particles=32, sigma=0.1, truncation_length=1, stagger=False)
    d = diagnose(est, theta, KEY, reference=exact, num_replicates=R, windows=5)
    assert d.estimator == "PES" and d.truncation_length == 1 and d.num_particles == 32
    assert d.num_replicates == R and d.num_components == 8 and d.reference_method == "given"
    assert d.bias_z_max < 4.5 and abs(d.bias_chi2_z) < 4, d
    assert d.relative_bias < 3 * d.bias_noise_floor / d.reference_norm
    assert d.inner_steps == 32 * 5 and d.windows == 5
    # V = spread (R - 1) / R + relative bias^2 (the reference is exact).
    assert d.normalized_variance == pytest.approx(
        d.normalized_spread * (R - 1) / R + d.relative_bias**2, rel=1e-6)
    out = json.loads(json.dumps(d.to_dict()))
    assert "bias" not in out and out["estimator"] == "PES"
    assert len(d.to_dict(components=True)["bias"]) == 8


@pytest.fixture(scope="module")
def full_es4(system):
    return pes.FullES(system, num_particles=4, sigma=0.1)


@pytest.mark.slow
def test_full_es_unbiased_and_variance_scales_as_one_over_n(system, theta, exact, full_es4):
    small = diagnose(full_es4, theta, KEY, reference=exact, num_replicates=R)
    large = diagnose(pes.FullES(system, num_particles=64, sigma=0.1), theta, KEY,
                     reference=exact, num_replicates=R)
    for d in (small, large):
        assert d.bias_z_max < 4.5, d
    assert small.inner_steps == 4 * 5 and large.inner_steps == 64 * 5
    ratio = small.normalized_variance / large.normalized_variance
    assert 8 < ratio < 32, ratio  # 16 expected; each V has ~15% standard error


@pytest.fixture(scope="module")
def tbptt_k1(theta):
    # All 20 one-step windows of an episode in lockstep: the truncation bias, not a position's.
    return pes.TBPTT(LinearQuadratic(horizon=20), num_particles=4, truncation_length=1,
                     stagger=False)


def test_tbptt_k1_biased(theta, tbptt_k1):
    d = diagnose(tbptt_k1, theta, KEY, reference=exact_for(tbptt_k1.system, theta),
                 num_replicates=20, windows=20)
    assert d.bias_z_max > 6 and d.bias_chi2_z > 6 and d.relative_bias > 0.5, d
    assert d.normalized_variance > 0.5 * d.relative_bias**2
    assert d.inner_steps == 4 * 20 and d.sigma is None


def test_replicates_are_independent_and_vmap_matches_loop(theta, tbptt_k1):
    # The batched path reuses tbptt_k1's compiled functions (same replicate count); the
    # system's noise makes replicates differ through their keys only.
    batched, cost_b = replicate_estimates(tbptt_k1, theta, KEY, 20, windows=20)
    looped, cost_l = replicate_estimates(tbptt_k1, theta, KEY, 20, windows=20, vmap=False)
    np.testing.assert_allclose(batched, looped, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cost_b, cost_l)
    assert batched.shape == (20, 8)
    assert len({tuple(np.round(row, 6)) for row in batched}) == 20  # no two replicates alike


def test_bad_reference_is_refused(system, theta):
    est = pes.PES(system, num_particles=4, sigma=0.1, truncation_length=2)
    with pytest.raises(ValueError, match="reference gradient"):
        diagnose(est, theta, KEY, reference={"b": np.zeros(())}, num_replicates=2)
    with pytest.raises(ValueError, match="reference method"):
        diagnose(est, theta, KEY, reference="bptt", num_replicates=2)
    with pytest.raises(ValueError, match="num_steps is required"):
        reference_gradient(InfluenceBalancing(), np.float32(0.5), KEY)
    ref = Reference(grad=exact_for(system, theta))
    assert ref.flat()[1].sum() == 0 and ref.to_dict()["relative_se"] == 0


@pytest.mark.slow
def test_tiny_variance_study_end_to_end(tmp_path):
    config = VarianceStudyConfig.tiny(
        sequence_length=4, truncation_lengths=(1, 4), variants=("repeat",),
        estimators=("pes",), num_replicates=6, reference_samples=4)
    result = run_variance_study(config)
    assert len(result.rows) == 2 and set(result.references) == {"repeat"}
    for row in result.rows:
        assert row["num_unrolls"] * row["truncation_length"] == 4
        assert row["normalized_variance"] > 0 and row["num_replicates"] == 6
        assert row["inner_steps"] == 2 * 4 and row["windows"] == row["num_unrolls"]
    path = plot_variance_study(result, tmp_path / "variance.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(result.save_json(tmp_path / "variance.json").read_text())
    assert saved["config"]["truncation_lengths"] == [1, 4] and len(saved["rows"]) == 2
    names = [c.claim for c in check_claims(result)]
    assert any("repeated token" in n for n in names)
    with pytest.raises(ValueError, match="dividing"):
        VarianceStudyConfig(sequence_length=10, truncation_lengths=(3,))
    with pytest.raises(ValueError, match="estimators"):
        VarianceStudyConfig(estimators=("rtrl",))
