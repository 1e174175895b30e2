"""`pes run` of one problem on 1 and on 2 (virtual CPU) devices, in subprocesses: the device
count must be set before JAX starts, so the test process itself cannot switch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_on_1_and_2_devices(args: list[str], cwd: Path) -> tuple[dict, dict]:
    """summary.json of ``pes run ARGS --devices 1`` and of ``... --devices 2`` (run in cwd)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(REPO)}
    summaries = []
    for n in (1, 2):
        out = cwd / f"dev{n}"
        done = subprocess.run([sys.executable, "-m", "pes", "run", *args, "--devices", str(n),
                               "--out", str(out)],
                              env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summaries.append(json.loads((out / "summary.json").read_text()))
    return summaries[0], summaries[1]
