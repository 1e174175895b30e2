"""Runs over several devices and several processes (hosts): the particle mesh and
``jax.distributed``.

Devices. A run's particles (pairs, for antithetic estimators) are split over a 1-D mesh of
``devices`` devices (:func:`particle_mesh`); the estimators shard their pair axis over it and
reduce it inside ``jit``, so the gradient is the same average, to float tolerance, as on one
device.

Processes. ``pes run --distributed`` starts one process per host (or per accelerator group);
:func:`initialize` connects them with ``jax.distributed.initialize`` before JAX computes
anything. The mesh then spans every process's devices, each process holds the particles of its
own devices, and every jitted step is one SPMD program whose reductions (the gradient's mean
over all particles) run over all processes (gloo collectives on CPU, NCCL on GPU). theta, the
optimizer state and every reported number come out replicated, so every process takes the same
steps; only process 0 writes files (:func:`is_primary`).

Where the coordinator is, how many processes there are and which one this is come from, in
order: the arguments (``--coordinator-address``, ``--num-processes``, ``--process-id``), the
environment variables PES_COORDINATOR_ADDRESS, PES_NUM_PROCESSES and PES_PROCESS_ID, and
otherwise JAX's own cluster detection (SLURM, Open MPI, TPU pods, ...; it also reads
JAX_COORDINATOR_ADDRESS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pes.runs.errors import ConfigError

ENV_VARS = {
    "coordinator_address": "PES_COORDINATOR_ADDRESS",
    "num_processes": "PES_NUM_PROCESSES",
    "process_id": "PES_PROCESS_ID",
}
MESH_AXIS = "particles"
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be an integer", field=name) from None


def distributed_settings(coordinator_address: str | None = None,
                         num_processes: int | None = None,
                         process_id: int | None = None) -> dict[str, Any]:
    """The settings given (arguments first, then the PES_* variables), checked; a None value
    is left to JAX's cluster detection."""
    source = {}
    values: dict[str, Any] = {}
    for name, given in (("coordinator_address", coordinator_address),
                        ("num_processes", num_processes), ("process_id", process_id)):
        env = ENV_VARS[name]
        if given is not None:
            values[name], source[name] = given, name
        elif name == "coordinator_address":
            text = os.environ.get(env)
            values[name] = text.strip() if text and text.strip() else None
            source[name] = env
        else:
            values[name], source[name] = _env_int(env), env
    address = values["coordinator_address"]
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"{source['coordinator_address']}={address!r} must be HOST:PORT, e.g. "
                          "node001:1234", field=source["coordinator_address"])
    n, i = values["num_processes"], values["process_id"]
    if n is not None and n < 1:
        raise ConfigError(f"{source['num_processes']}={n} must be >= 1",
                          field=source["num_processes"])
    if i is not None and (i < 0 or (n is not None and i >= n)):
        upper = f" and < {source['num_processes']}={n}" if n is not None else ""
        raise ConfigError(f"{source['process_id']}={i} must be >= 0{upper}",
                          field=source["process_id"])
    return values


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = DEFAULT_TIMEOUT_S
               ) -> ProcessInfo:
    """Connect this process to the others (``jax.distributed.initialize``); call it before
    JAX computes anything. Waits up to ``timeout_s`` for every process to join.

    On CPU the cross-process collectives go through gloo. A ConfigError says what is wrong
    with the settings or why JAX could not start.
    """
    import jax
    from jax._src import xla_bridge

    settings = distributed_settings(coordinator_address, num_processes, process_id)
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return process_info()
    if xla_bridge.backends_are_initialized():
        raise ConfigError("--distributed: JAX has already computed something in this process; "
                          "jax.distributed must be initialised first (start a fresh process)",
                          field="distributed")
    try:  # gloo is the default in recent jaxlib; older ones had no CPU collectives by default
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):
        pass
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **settings)
    except (ValueError, RuntimeError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items() if v is not None)
        why = " ".join(str(e).split())
        hint = ("" if settings["coordinator_address"] else
                "; outside SLURM, Open MPI and the other clusters JAX detects, give "
                "--coordinator-address, --num-processes and --process-id (or "
                f"{', '.join(ENV_VARS.values())})")
        raise ConfigError(f"--distributed: jax.distributed.initialize failed"
                          f"{' with ' + given if given else ''}: {why[:400]}{hint}",
                          field="distributed") from None
    return process_info()


def process_info() -> ProcessInfo:
    import jax

    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count())


def is_primary() -> bool:
    """True in process 0 (the one that writes files), and in every single-process run."""
    import jax

    return jax.process_index() == 0


def multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a single-process run)."""
    if multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def max_over_processes(values: list[int]) -> list[int]:
    """Element-wise maximum of small int lists over all processes (one collective), so that
    decisions taken from local facts (a signal, a clock) are the same in every process."""
    if not multiprocess():
        return list(values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return [int(v) for v in np.max(np.asarray(gathered), axis=0)]


def particle_mesh(devices: int | None) -> Any:
    """The 1-D mesh (axis 'particles') a run shards its particles over, or None for one device.

    devices: mesh size; None is 1 in a single-process run and every device of every process
    in a distributed one. Across processes it must be a multiple of the process count, each
    process giving its first ``devices / processes`` devices. A ConfigError when the devices
    are not there.
    """
    import jax

    count, procs = jax.device_count(), jax.process_count()
    if devices is None:
        devices = count if procs > 1 else 1
    if devices > count:
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (f"; on CPU, start the process with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={devices} to split the host into "
                    f"{devices} devices")
        where = f" over {procs} processes" if procs > 1 else ""
        raise ConfigError(f"devices={devices} must be in [1, {count}]: JAX sees {count} "
                          f"{jax.default_backend()} device{'s' * (count != 1)}{where}{hint}",
                          field="devices")
    if devices == 1 and procs == 1:
        return None
    if devices % procs:
        raise ConfigError(f"devices={devices} must be a multiple of the {procs} processes (each "
                          f"gives the same number of devices): pass --devices {count} (every "
                          "device) or another multiple", field="devices")
    per = devices // procs
    chosen = []
    for p in range(procs):
        mine = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        if len(mine) < per:
            raise ConfigError(f"devices={devices} needs {per} devices in each of the {procs} "
                              f"processes, but process {p} has {len(mine)}", field="devices")
        chosen.extend(mine[:per])
    auto = (jax.sharding.AxisType.Auto,)
    return jax.sharding.Mesh(np.array(chosen), (MESH_AXIS,), axis_types=auto)
