"""Run by test_sharding.py in a process with 4 forced CPU devices: sharded == unsharded.

    python tests/sharded_check.py [NAME,NAME,...]

checks the named estimators (keys of ``makers`` below), ``train`` (the chunked train loop on
the mesh) and ``errors`` (a pair count the mesh does not divide); all of them by default.
``--list`` prints every check's name, comma-separated, and checks nothing.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from systems import LinearQuadratic, theta_dict  # noqa: E402

import pes  # noqa: E402


def run(make, mesh):
    est = make(mesh)
    theta = theta_dict()
    state = est.init(jax.random.PRNGKey(0), theta)
    out = []
    for i in range(3):
        g, state, info = est.estimate(state, theta, jax.random.PRNGKey(i + 1))
        out.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
        out.append(np.atleast_1d(np.asarray(info.loss)))
    leaf = jax.tree_util.tree_leaves(state.inner)[0]
    return np.concatenate(out), leaf.sharding


def main():
    assert len(jax.devices()) == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("particles",))  # explicit axes, as jax.make_mesh now makes
    system = LinearQuadratic(horizon=5)
    kw = dict(num_particles=16, sigma=0.1)
    makers = {
        "pes": lambda m: pes.PES(system, truncation_length=2, mesh=m, **kw),
        "pes-plain": lambda m: pes.PES(system, truncation_length=2, antithetic=False, mesh=m,
                                       **kw),
        "tes": lambda m: pes.TruncatedES(system, truncation_length=2, mesh=m, **kw),
        "nres": lambda m: pes.NRES(system, truncation_length=2, mesh=m, **kw),
        "full-es": lambda m: pes.FullES(system, mesh=m, **kw),
        "tbptt": lambda m: pes.TBPTT(system, num_particles=8, truncation_length=2, mesh=m),
        "tbptt-deep": lambda m: pes.TBPTT(system, num_particles=8, truncation_length=2,
                                          backprop_depth=7, mesh=m),
        "full-bptt": lambda m: pes.FullBPTT(system, num_particles=8, mesh=m),
        "rtrl": lambda m: pes.RTRL(system, num_particles=4, truncation_length=2, mesh=m),
        "uoro": lambda m: pes.UORO(system, num_particles=8, truncation_length=2, mesh=m),
    }
    every = [*makers, "train", "errors"]
    if sys.argv[1:] == ["--list"]:
        print(",".join(every))
        return
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else every
    unknown = set(names) - set(every)
    assert not unknown, f"unknown checks {sorted(unknown)}"
    for name in (n for n in names if n in makers):
        make = makers[name]
        plain, _ = run(make, None)
        sharded, sharding = run(make, mesh)
        np.testing.assert_allclose(sharded, plain, rtol=2e-5, atol=1e-6, err_msg=name)
        assert len(sharding.device_set) == 4, (name, sharding)
        print(name, "ok", sharding.spec)
    if "train" in names:
        check_train(makers["pes"], mesh)
    if "errors" in names:
        check_errors(system, mesh)
    print("ALL OK")


def check_train(make_pes, mesh):
    # train's chunked mode traces the sharded estimate into its compiled loop.
    trained = [pes.train(make_pes(m), theta_dict(), optax.adam(0.01), num_steps=6,
                         key=jax.random.PRNGKey(5), steps_per_call=spc)
               for m, spc in ((None, 1), (mesh, 4))]
    (theta1, h1), (theta4, h4) = trained
    np.testing.assert_allclose(h4.column("loss"), h1.column("loss"), rtol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(theta4), jax.tree_util.tree_leaves(theta1),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    print("train steps_per_call=4 on the mesh ok")


def check_errors(system, mesh):
    try:
        pes.PES(system, num_particles=6, sigma=0.1, truncation_length=2, mesh=mesh)
    except ValueError as e:
        assert "do not divide the 3 particle pairs" in str(e), e
    else:
        raise AssertionError("3 pairs on 4 devices were accepted")


if __name__ == "__main__":
    main()
