"""normalize_losses: the ES family's estimate scaled by 2 sigma / (std of the particles' window
losses), as augmented random search scales by the spread of the rewards."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from systems import LinearQuadratic, flat, theta_dict
from typer.testing import CliRunner

import pes
from pes.cli import app
from pes.runs import ConfigError, RunConfig


class Linear:
    """Stateless l_t = c theta: a particle at theta + eps has window loss c (theta + eps) at
    every step, so with N pairs g = c mean(eps^2) / sigma^2 and the losses' spread is
    s = |c| sqrt(mean(eps^2)); the normalised estimate is 2 sign(c) sqrt(g / c)."""

    def __init__(self, c, horizon=None):
        self.c = c
        self.horizon = horizon

    def init(self, key):
        return jnp.zeros(())

    def step(self, s, theta, t, key):
        return s, self.c * theta


ESTIMATORS = {
    "pes": lambda sys, **kw: pes.PES(sys, truncation_length=3, stagger=False, **kw),
    # TES's unperturbed member must stay out of the spread: counted, it would shrink s.
    "tes": lambda sys, **kw: pes.TruncatedES(sys, truncation_length=3, **kw),
    "nres": lambda sys, **kw: pes.NRES(sys, truncation_length=3, stagger=False, **kw),
    "full-es": lambda sys, **kw: pes.FullES(sys, **kw),
}


def estimate(make, system, theta, normalize, key=1):
    est = make(system, num_particles=40, sigma=0.1, normalize_losses=normalize)
    state = est.init(jax.random.PRNGKey(0), theta)
    return est.estimate(state, theta, jax.random.PRNGKey(key))[0]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("c", [2.0, -0.5])
def test_normalised_estimate_matches_closed_form(name, c):
    system = Linear(c, horizon=None if name in ("pes", "tes") else 30)
    if name == "full-es":
        system = Linear(c, horizon=3)
    theta = jnp.array(0.7)
    g = float(estimate(ESTIMATORS[name], system, theta, False))
    gn = float(estimate(ESTIMATORS[name], system, theta, True))
    assert g / c > 0
    np.testing.assert_allclose(gn, 2 * np.sign(c) * np.sqrt(g / c), rtol=1e-5)


class Affine:
    """A system's losses mapped to a * l + b."""

    def __init__(self, system, a, b):
        self.system, self.a, self.b = system, a, b
        self.horizon = system.horizon

    def init(self, key):
        return self.system.init(key)

    def step(self, s, theta, t, key):
        s, loss = self.system.step(s, theta, t, key)
        return s, self.a * loss + self.b


@pytest.mark.parametrize("name", ["pes", "tes"])
def test_normalised_estimate_ignores_the_loss_scale(name):
    base = LinearQuadratic(horizon=6)
    theta = theta_dict()
    plain = flat(estimate(ESTIMATORS[name], base, theta, False))
    norm = flat(estimate(ESTIMATORS[name], base, theta, True))
    scaled_norm = flat(estimate(ESTIMATORS[name], Affine(base, 100.0, 7.0), theta, True))
    np.testing.assert_allclose(scaled_norm, norm, rtol=1e-3, atol=1e-5)
    # Same direction as the plain estimate, a positive factor apart.
    ratio = norm / plain
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
    assert ratio[0] > 0


def test_identical_losses_give_a_zero_step():
    g = estimate(ESTIMATORS["pes"], Linear(0.0), jnp.array(0.7), True)
    assert float(g) == 0.0


def test_config_and_command_line_settings(tmp_path):
    config = RunConfig("toy-regression", "pes", normalize_losses=True).resolve()
    assert config.estimator_kwargs()["normalize_losses"] is True
    assert "losses normalised" in config.settings_text()
    assert RunConfig("toy-regression", "pes").resolve().normalize_losses is False
    with pytest.raises(ConfigError, match="normalize_losses=.yes. must be true or false"):
        RunConfig("toy-regression", "pes", normalize_losses="yes")
    with pytest.raises(ConfigError, match="normalize_losses=True contradicts estimator='tbptt'"):
        RunConfig("toy-regression", "tbptt", normalize_losses=True).resolve()

    # stagger, the other setting the paper's control runs change, goes the same way.
    assert RunConfig("toy-regression", "pes").resolve().stagger is True
    config = RunConfig("toy-regression", "tbptt", stagger=False).resolve()
    assert config.estimator_kwargs()["stagger"] is False
    with pytest.raises(ConfigError, match="stagger=False contradicts estimator='full-es'"):
        RunConfig("toy-regression", "full-es", stagger=False).resolve()

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "toy-regression", "-e", "pes", "--num-steps", "2",
                                      "--normalize-losses", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["normalize_losses"] is True
