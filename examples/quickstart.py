"""Quick start: tune the learning-rate schedule of an inner SGD run with PES and optax.

The inner problem is noisy gradient descent on an ill-conditioned quadratic for T = 200 steps.
theta = (log lr at the start, log lr at the end) of a linear schedule; the meta-objective is
the mean training loss over the run. PES updates theta every K = 20 inner steps, without the
short-horizon bias of truncated ES, which prefers small learning rates.
"""

import jax
import jax.numpy as jnp
import optax

import pes


class NoisyQuadratic:
    """Inner state: the iterate x in R^2; loss 0.5 x^T H x with H = diag(1, 20)."""

    horizon = 200

    def init(self, key):
        return jnp.array([3.0, 1.0])

    def step(self, x, theta, t, key):
        frac = t / self.horizon
        lr = jnp.exp(theta[0]) * (1 - frac) + jnp.exp(theta[1]) * frac
        h = jnp.array([1.0, 20.0])
        grad = h * x + 0.3 * jax.random.normal(key, x.shape)  # a minibatch's noisy gradient
        x = x - lr * grad
        return x, 0.5 * jnp.sum(h * x**2)


def main():
    system = NoisyQuadratic()
    theta = jnp.log(jnp.array([1e-3, 1e-3]))
    estimator = pes.PES(system, num_particles=64, sigma=0.1, truncation_length=20)

    def report(record, theta):
        if record.meta_objective is not None:
            lr0, lr1 = jnp.exp(theta)
            print(f"step {record.step:4d}  inner steps {record.inner_steps:8d}  "
                  f"meta-objective {record.meta_objective:8.4f}  lr {lr0:.4f} -> {lr1:.4f}")

    print("PES on the learning-rate schedule of SGD (meta-objective: mean training loss)")
    theta, history = pes.train(estimator, theta, optax.adam(0.05), num_steps=300,
                               key=jax.random.PRNGKey(0), eval_every=30, eval_episodes=16,
                               callback=report)
    first, last = history.evaluated()[0], history.evaluated()[-1]
    print(f"meta-objective {first.meta_objective:.4f} -> {last.meta_objective:.4f}; "
          f"final theta = log lr {theta.tolist()} (lr {jnp.exp(theta).tolist()})")


if __name__ == "__main__":
    main()
