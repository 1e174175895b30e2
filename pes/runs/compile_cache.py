"""JAX's persistent compilation cache for the command line: compile once, start fast after.

A one-step ``pes run`` spends most of its start-up compiling XLA programs; JAX can keep the
compiled programs on disk and load them in the next process that builds the same program
(same code, shapes, flags, jax version and device). :func:`enable` turns that on in

    $PES_COMPILE_CACHE_DIR, else $XDG_CACHE_HOME/pes/jax, else ~/.cache/pes/jax

for every program that took at least ``min_compile_time_s`` to compile (JAX's default, 1 s,
would leave out most of a run's many small programs). ``pes`` does this by default;
``--no-compile-cache`` or ``PES_NO_COMPILE_CACHE=1`` turn it off. Deleting the folder is always
safe (the next run compiles again).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DIR = "PES_COMPILE_CACHE_DIR"
ENV_OFF = "PES_NO_COMPILE_CACHE"
MIN_COMPILE_TIME_S = 0.0


def default_dir() -> Path:
    """Where the cache lives (see the module docstring)."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pes" / "jax"


def disabled_by_env() -> bool:
    return os.environ.get(ENV_OFF, "").strip().lower() not in ("", "0", "false", "no")


def enable(directory: str | os.PathLike | None = None, *,
           min_compile_time_s: float = MIN_COMPILE_TIME_S) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (default :func:`default_dir`);
    returns the folder, or None when $PES_NO_COMPILE_CACHE is set or the folder cannot be
    created (a read-only home: the run simply compiles as usual)."""
    if disabled_by_env():
        return None
    path = Path(directory).expanduser() if directory is not None else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def disable() -> None:
    """Turn the persistent cache off for this process (programs compiled from now on)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", None)
