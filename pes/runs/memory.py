"""Will a run fit in memory? An estimate before it starts, and one line if XLA runs out.

A run keeps its TrainState (theta, optimizer state and the estimator's state: every particle's
inner state, perturbation and accumulator) on the device, and while a step runs XLA holds
working copies of the particles' carries, perturbations and losses besides. :func:`estimate`
takes the state's size from ``jax.eval_shape`` (nothing is allocated) and multiplies it by
WORKING_COPIES, measured: PES on toy regression with 6M particles (a 0.10 GB state) peaked at
0.79 GB of resident memory above the process's baseline, 7.6x the state, on CPU. A run that
passes may still exhaust memory (other estimators and tasks hold more per particle), which
:func:`out_of_memory_message` turns into the same kind of line where XLA reports it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from pes.runs.errors import ConfigError

WORKING_COPIES = 8


def _bytes(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate(estimator: Any, optimizer: Any, theta: Any) -> int:
    """Bytes a run of (estimator, optimizer, theta) needs at least: WORKING_COPIES x its state."""
    from pes.runs.checkpoint import abstract_state

    state = abstract_state(estimator, optimizer, theta)
    return WORKING_COPIES * _bytes((state.theta, state.opt_state, state.estimator_state))


def available(device: Any | None = None) -> tuple[int | None, str]:
    """(bytes free, where) on ``device`` (default: the first local device): an accelerator's
    free memory from its memory_stats, else the host's MemAvailable (/proc/meminfo) or physical
    memory; None when unknown."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = getattr(device, "memory_stats", lambda: None)() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(limit) - int(stats.get("bytes_in_use", 0)), f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available on this machine"
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "on this machine"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


ADVICE = "lower --num-particles (or --truncation-length), or spread the particles with --devices"


def check(estimator: Any, optimizer: Any, theta: Any, *, devices: int = 1,
          field: str = "num_particles") -> None:
    """ConfigError (one line) when the estimate exceeds what the device has; ``devices``: how
    many devices share the particles."""
    need = estimate(estimator, optimizer, theta) / max(1, devices)
    have, where = available()
    if have is not None and need > have:
        raise ConfigError(
            f"this run needs at least {fmt_bytes(need)} of memory per device (its state: "
            f"{fmt_bytes(need / WORKING_COPIES)}, x{WORKING_COPIES} while a step runs), but "
            f"{fmt_bytes(have)} is {where}; {ADVICE}", field=field)


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's out-of-memory errors (RESOURCE_EXHAUSTED) and MemoryError."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or \
        "out of memory" in text.lower()


def out_of_memory_message(error: BaseException) -> str:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()),
                 type(error).__name__)
    first = first if len(first) <= 200 else first[:197] + "..."
    have, where = available()
    room = f"; {fmt_bytes(have)} is {where}" if have is not None else ""
    return f"the run ran out of memory ({first}){room}; {ADVICE}"
