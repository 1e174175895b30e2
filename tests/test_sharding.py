"""Particles sharded over 4 forced CPU devices give the unsharded results."""

import os
import subprocess
import sys

import jax
import pytest
from systems import LinearQuadratic

import pes

# Groups of checks, each in its own 4-device process, so that test workers can share them.
GROUPS = ["pes,pes-plain,errors", "tes,nres,full-es", "train", "tbptt,tbptt-deep,full-bptt",
          "rtrl,uoro"]
# 40-50 s each on 2 cores: the fast suite keeps PES's, the training loop's and RTRL/UORO's.
SLOW_GROUPS = {"tes,nres,full-es", "tbptt,tbptt-deep,full-bptt"}


def _sharded_check(arg):
    script = os.path.join(os.path.dirname(__file__), "sharded_check.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, script, arg], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("checks", [pytest.param(g, marks=pytest.mark.slow)
                                    if g in SLOW_GROUPS else g for g in GROUPS])
def test_sharded_estimates_equal_unsharded(checks):
    assert "ALL OK" in _sharded_check(checks)


def test_groups_cover_every_sharded_check():
    every = _sharded_check("--list").strip().splitlines()[-1].split(",")
    grouped = [name for group in GROUPS for name in group.split(",")]
    assert sorted(grouped) == sorted(every)


def test_mesh_argument_is_checked():
    mesh = jax.make_mesh((1,), ("particles",))
    pes.PES(LinearQuadratic(5), num_particles=6, sigma=0.1, truncation_length=2, mesh=mesh)
    with pytest.raises(TypeError, match="mesh="):
        pes.PES(LinearQuadratic(5), num_particles=6, sigma=0.1, truncation_length=2, mesh=4)
