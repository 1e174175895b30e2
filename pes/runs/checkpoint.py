"""Checkpoints of a training run: the complete :class:`pes.TrainState`, written with orbax.

A checkpoint of outer step ``s`` is the folder ``DIR/s`` holding two orbax items:

* ``state``: the arrays, ``{"theta", "opt_state", "estimator_state", "key"}`` (the optimizer
  state and the estimator's state with every particle's inner state, noise and accumulator;
  ``key`` is the run's PRNG key data, uint32);
* ``meta``: a small JSON object, ``{"step", "inner_steps", "arrays", **extra}`` (``arrays``:
  path, shape and dtype of every array, checked before restoring so that a mismatch is one
  clear line; ``extra`` is the caller's, e.g. the position reached in a metrics log).

Writes go through ``orbax.checkpoint.CheckpointManager``: each is written to
``DIR/s.orbax-checkpoint-tmp`` and renamed to ``DIR/s`` once complete, so a write cut short (a
crash, SIGKILL, a full disk) leaves the previous checkpoint as the latest, never a half one;
leftover temporary folders are removed when the next Checkpointer opens ``DIR`` (by process 0
of a distributed run, while the others wait; every process takes part in each save, as orbax
requires, and ``DIR`` must be on a filesystem they all see). Writes are asynchronous by
default: ``save`` copies the arrays to host memory and returns while a background thread
writes them (``wait`` blocks until the last one is on disk; ``close`` waits too).

Every checkpoint proves itself: once orbax has committed it, ``DIR/s/pes_manifest.json``
(:mod:`pes.runs.manifest`, written last and atomically) records the size and SHA-256 of each of
its files, and ``restore`` checks them before reading anything, so a truncated file, damaged
metadata or a flipped bit in array data is a :class:`CheckpointDamaged` error, never restored
as data. :meth:`Checkpointer.restore_latest` falls back to the newest intact checkpoint. Only
the newest ``max_to_keep`` proven checkpoints are kept (older ones are deleted once a newer one
is proven). A write that fails (a full disk) raises :class:`CheckpointWriteError` naming the
intact previous checkpoint, after removing its partial folder.

Restoring needs the *shape* of the state, which a fresh init gives without computing
anything::

    like = pes.runs.checkpoint.abstract_state(estimator, optimizer, theta0)
    state, key, meta = Checkpointer(dir).restore(like)
    pes.train(estimator, theta0, optimizer, key=key, resume=state, ...)

so NamedTuples (optax states, ParticleState), dtypes and shapes come back exactly as they were.
``on_mesh(like, mesh)`` adds the shardings of the restoring run's own mesh, so a checkpoint
written on any devices and processes can be restored on any others.
orbax is imported on first use (it takes about a second).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pes.runs import manifest
from pes.system import PyTree
from pes.training import TrainState

TMP_SUFFIX = ".orbax-checkpoint-tmp"
ITEMS = ("state", "meta")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _key_data(key: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def abstract_state(estimator: Any, optimizer: Any, theta: PyTree) -> TrainState:
    """The TrainState a fresh run of (estimator, optimizer, theta) starts from, as
    ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``: nothing is computed).

    It is the target a checkpoint is restored into: the pytree structure (NamedTuples
    included), every shape and every dtype.
    """
    key = jax.random.PRNGKey(0)

    def fresh():
        return (optimizer.init(theta), estimator.init(key, theta))

    opt_state, est_state = jax.eval_shape(fresh)
    theta_like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                        theta)
    return TrainState(theta_like, opt_state, est_state, 0, 0)


class Checkpointer:
    """Save and restore TrainStates in one directory (see the module docstring).

    Args:
      directory: the checkpoint folder (created on the first save).
      max_to_keep: how many of the latest checkpoints are kept (older ones are deleted).
      asynchronous: write in a background thread (``save`` returns once the arrays are copied).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2,
                 asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r} must be None or an integer >= 1")
        self.max_to_keep = max_to_keep
        self._unproven: list[int] = []  # written by this object, manifest not yet written
        # Several processes (a distributed run) share the folder: one cleans it, all wait.
        self.removed = remove_partial_writes(self.directory) if jax.process_index() == 0 \
            else []
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"pes-checkpointer-open:{self.directory}")
        self._asynchronous = asynchronous
        self._orbax_manager = None

    @property
    def _manager(self) -> Any:
        """orbax's CheckpointManager, made at its first use: importing orbax takes a second or
        more, which a run's start need not wait for (its first checkpoint comes later)."""
        if self._orbax_manager is None:
            ocp = _ocp()
            # Pruning is ours (:meth:`_prune`): only checkpoints proven by a manifest count.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, create=False, enable_async_checkpointing=self._asynchronous)
            self._orbax_manager = ocp.CheckpointManager(self.directory, options=options,
                                                        item_names=ITEMS)
        return self._orbax_manager

    # ------------------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """The outer steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The outer step of the latest complete checkpoint, None if there is none."""
        return self._manager.latest_step()

    # ---------------------------------------------------------------------------- writing

    def save(self, state: TrainState, key: jax.Array, extra: dict[str, Any] | None = None
             ) -> bool:
        """Checkpoint ``state`` (as outer step ``state.step``) with the run's ``key``.

        ``extra``: JSON-ready data stored beside it (returned by ``restore``). A step that
        already has a checkpoint is not written again (returns False).
        """
        ocp = _ocp()
        self._finalize()  # the previous write: complete, proven by its manifest, pruned
        step = int(state.step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            if step in self.steps():
                return False
            raise ValueError(f"cannot checkpoint outer step {step}: {self.directory} already "
                             f"holds a later checkpoint (step {latest})")
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = _global({"theta": state.theta, "opt_state": state.opt_state,
                          "estimator_state": state.estimator_state, "key": _key_data(key)})
        meta = {**(extra or {}), "step": step, "inner_steps": int(state.inner_steps),
                "arrays": _signature(arrays)}
        try:
            saved = self._manager.save(
                step, force=True,
                args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                        meta=ocp.args.JsonSave(meta)))
        except OSError as e:
            raise self._write_failed(step, e) from None
        if not saved:
            raise RuntimeError(f"orbax did not write the checkpoint of step {step} in "
                               f"{self.directory}")
        self._unproven.append(step)
        if not self._manager.is_saving_in_progress():
            self._finalize()
        return True

    def _write_failed(self, step: int, error: BaseException) -> CheckpointWriteError:
        """The one-line error of a write that failed (a full disk); its partial folder is
        removed so that the previous checkpoint stays the latest and the space comes back."""
        if jax.process_index() == 0:
            remove_partial_writes(self.directory)
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        self._unproven = [s for s in self._unproven if s != step]
        try:
            self._manager.reload()
        except Exception:  # noqa: BLE001 - the write error is what the user must see
            pass
        kept = self.proven_steps()
        why = _short(error, 160)
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "No space left on device" in str(error):
            why = "No space left on device"
        elif getattr(error, "strerror", None):
            why = error.strerror
        previous = (f"the checkpoint of step {kept[-1]} is intact" if kept
                    else "no earlier checkpoint exists")
        return CheckpointWriteError(
            f"the checkpoint of step {step} could not be written in {self.directory} ({why}); "
            f"{previous}", step=step, errno=getattr(error, "errno", None))

    def _finalize(self) -> None:
        """Wait for the write in progress; then write the manifest of every checkpoint this
        object wrote (process 0) and prune. A write that failed in the background (a full
        disk) raises CheckpointWriteError here."""
        try:
            if self._orbax_manager is not None:  # else nothing was written or read
                with _quiet_orbax():
                    self._orbax_manager.wait_until_finished()
        except Exception as e:  # orbax re-raises its writer thread's error
            step = self._unproven[-1] if self._unproven else -1
            raise self._write_failed(step, e) from None
        if jax.process_index() == 0:
            for step in self._unproven:
                folder = self.directory / str(step)
                if folder.is_dir():
                    try:
                        manifest.write(folder)
                    except OSError as e:
                        (folder / manifest.MANIFEST).unlink(missing_ok=True)
                        raise self._write_failed(step, e) from None
            self._prune()
        self._unproven = []

    def proven_steps(self) -> list[int]:
        """Steps whose checkpoint folder has a checksum manifest, ascending (not verified)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and manifest.has_manifest(p))

    def _prune(self) -> None:
        """Keep the newest ``max_to_keep`` proven checkpoints and anything newer than the
        oldest of them; delete the rest (older proven ones, older unproven ones)."""
        if self.max_to_keep is None:
            return
        proven = self.proven_steps()
        if len(proven) < self.max_to_keep:
            return
        oldest_kept = proven[-self.max_to_keep]
        doomed = [s for s in self.steps() if s < oldest_kept]
        for step in doomed:
            # Renamed first (atomic), so that a crash mid-deletion leaves a temporary folder
            # (removed on the next open), never a half-deleted checkpoint under its step.
            gone = self.directory / f"{step}.pruned{TMP_SUFFIX}"
            os.replace(self.directory / str(step), gone)
            shutil.rmtree(gone, ignore_errors=True)
        if doomed:
            self._manager.reload()

    def wait(self) -> None:
        """Block until every checkpoint written so far is complete (and proven) on disk."""
        self._finalize()

    def close(self) -> None:
        """Wait for pending writes, prove them, and release the manager's resources."""
        try:
            self._finalize()
        finally:
            if self._orbax_manager is not None:
                self._orbax_manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quarantine(self, step: int, into: str | os.PathLike) -> Path:
        """Move the (damaged) checkpoint of ``step`` out of the way, into the folder ``into``
        (created), so that the run can write that step again; returns its new place."""
        into = Path(into)
        into.mkdir(parents=True, exist_ok=True)
        target = into / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while target.exists():
            target = into / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            n += 1
        shutil.move(str(self.directory / str(step)), target)
        self._manager.reload()
        return target

    # ---------------------------------------------------------------------------- reading

    def restore(self, like: TrainState, step: int | None = None
                ) -> tuple[TrainState, jax.Array, dict[str, Any]]:
        """(state, key, meta) of checkpoint ``step`` (default: the latest).

        like: the TrainState to restore into, e.g. :func:`abstract_state`; its structure,
          shapes and dtypes must be those of the saved one (else a ValueError names the
          difference); leaves with a ``sharding`` (:func:`on_mesh`) are restored onto it.
          key: the PRNG key data (uint32) saved with it. meta: the saved JSON.
        """
        ocp = _ocp()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory} holds no complete checkpoint")
        target = {
            "theta": like.theta, "opt_state": like.opt_state,
            "estimator_state": like.estimator_state,
            "key": jax.ShapeDtypeStruct((2,), np.uint32),
        }
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                           sharding=getattr(x, "sharding", None)), target)
        if like_key_sharding := _replicated_like(like):
            target["key"] = jax.ShapeDtypeStruct((2,), np.uint32, sharding=like_key_sharding)
        where = f"the checkpoint of step {step} in {self.directory}"
        folder = self.directory / str(step)
        if manifest.has_manifest(folder):
            try:
                manifest.verify(folder, step)
            except manifest.CheckpointDamaged as e:
                raise manifest.CheckpointDamaged(f"{where} is damaged: {e}", step) from None
        try:
            with _quiet_orbax():
                saved = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise manifest.CheckpointDamaged(f"{where} cannot be read: {_short(e)}",
                                             step) from None
        if not isinstance(saved, dict):
            raise manifest.CheckpointDamaged(f"{where} has no readable metadata", step)
        _check_signature(saved.get("arrays"), _signature(target), step, self.directory)
        try:
            with _quiet_orbax():
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                  meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax's errors: a missing or damaged file
            raise manifest.CheckpointDamaged(
                f"{where} cannot be restored into this run's state: {_short(e)}", step
            ) from None
        arrays, meta = restored.state, dict(restored.meta)
        meta.pop("arrays", None)
        _check_like(arrays, target, step, self.directory)
        state = TrainState(arrays["theta"], arrays["opt_state"], arrays["estimator_state"],
                           int(meta["step"]), int(meta["inner_steps"]))
        return state, arrays["key"], meta

    def restore_latest(self, like: TrainState, steps: list[int] | None = None
                       ) -> tuple[TrainState, jax.Array, dict[str, Any], list[tuple[int, str]]]:
        """(state, key, meta, skipped) of the newest checkpoint that is intact.

        Tries ``steps`` (default: all, newest first); a damaged or unreadable one
        (:class:`CheckpointDamaged`) is skipped and listed in ``skipped`` as (step, why). Raises
        the last CheckpointDamaged when none is intact, FileNotFoundError when there is none, and
        a plain ValueError (not skipped) for a checkpoint of another run's shape.
        """
        order = sorted(self.steps() if steps is None else steps, reverse=True)
        if not order:
            raise FileNotFoundError(f"{self.directory} holds no complete checkpoint")
        skipped: list[tuple[int, str]] = []
        for step in order:
            try:
                state, key, meta = self.restore(like, step)
            except manifest.CheckpointDamaged as e:
                skipped.append((step, str(e)))
                continue
            return state, key, meta, skipped
        raise manifest.CheckpointDamaged(
            f"no intact checkpoint in {self.directory}: " + "; ".join(w for _, w in skipped),
            order[-1])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact.
    ``step``: the checkpoint that failed."""

    def __init__(self, message: str, step: int | None = None, errno: int | None = None):
        super().__init__(message)
        self.step = step
        self.write_errno = errno


CheckpointDamaged = manifest.CheckpointDamaged


def _short(error: BaseException, limit: int = 300) -> str:
    why = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    why = why if len(why) <= limit else why[:limit - 3] + "..."
    return why or type(error).__name__


@contextmanager
def _quiet_orbax():
    """absl's log (where orbax reports a damaged file, bytes included) silenced: the caller
    turns the failure into one line of its own."""
    import logging

    from absl import logging as absl_logging

    logger = logging.getLogger("absl")
    level, verbosity = logger.level, absl_logging.get_verbosity()
    logger.setLevel(logging.CRITICAL + 1)
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        logger.setLevel(level)


def _global(arrays: PyTree) -> PyTree:
    """In a multi-process run, every array that lives in this process alone (the run's key,
    a fresh init's leaves) as the replicated global array orbax can write: each process holds
    the same value, so process 0's copy is the one written."""
    if jax.process_count() == 1:
        return arrays
    everywhere = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec())

    def lift(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        return jax.make_array_from_process_local_data(everywhere, np.asarray(x))

    return jax.tree_util.tree_map(lift, arrays)


def on_mesh(like: TrainState, mesh: jax.sharding.Mesh | None) -> TrainState:
    """``like`` with a sharding on every leaf, for restoring into a run on ``mesh``.

    The estimator state's leaves are split along their leading (particle) axis over all of
    the mesh's devices when it divides evenly, and replicated otherwise; theta and the
    optimizer state are replicated. With no mesh, everything goes to this process's first
    device. The shardings do not depend on the devices or processes that wrote the
    checkpoint, so a run on any number of them can restore it.
    """
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        replicated = split = one
        size = 1
    else:
        size = mesh.size
        P = jax.sharding.PartitionSpec
        replicated = jax.sharding.NamedSharding(mesh, P())
        split = jax.sharding.NamedSharding(mesh, P(mesh.axis_names))

    def place(x, by_particle):
        shape = np.shape(x)
        sharding = split if by_particle and shape and shape[0] % size == 0 \
            else replicated
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)

    return TrainState(
        jax.tree_util.tree_map(lambda x: place(x, False), like.theta),
        jax.tree_util.tree_map(lambda x: place(x, False), like.opt_state),
        jax.tree_util.tree_map(lambda x: place(x, True), like.estimator_state),
        like.step, like.inner_steps)


def _replicated_like(like: TrainState) -> jax.sharding.Sharding | None:
    """The sharding of theta's first leaf with every axis replicated (where the key goes)."""
    leaves = jax.tree_util.tree_leaves(like.theta)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def remove_partial_writes(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary folders of checkpoint writes that never finished in
    ``directory`` (a crash or SIGKILL mid-write leaves one); returns their names.

    Done here, before orbax opens the folder, rather than with orbax's
    ``cleanup_tmp_directories``, which runs in a background thread that may still be going
    when a short-lived process exits.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if TMP_SUFFIX in path.name:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _signature(arrays: PyTree) -> list[list]:
    """[path, shape, dtype] of every array leaf, e.g. ["['opt_state'][0].mu", [2], "float32"]."""
    leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
    return [[jax.tree_util.keystr(path), list(np.shape(x)), str(np.dtype(x.dtype))]
            for path, x in leaves]


def _check_signature(saved: list | None, wanted: list, step: int, directory: Path) -> None:
    """A one-line ValueError naming the first array that differs, if any."""
    if saved is None:
        return  # written without a signature: orbax checks on restore
    where = f"the checkpoint of step {step} in {directory}"

    def text(entry):
        return f"{entry[2]}{entry[1]}"

    saved_paths = {e[0]: e for e in saved}
    for entry in wanted:
        have = saved_paths.get(entry[0])
        if have is None:
            raise ValueError(f"{where} has no array at {entry[0]} ({text(entry)}), which this "
                             "run's state has: it was written by a run with another "
                             "estimator, optimizer or task")
        if list(have[1]) != list(entry[1]) or have[2] != entry[2]:
            raise ValueError(f"{where} holds {entry[0]} as {text(have)}, but this run's state "
                             f"has {text(entry)}: it was written with other settings")
    extra = [e[0] for e in saved if e[0] not in {w[0] for w in wanted}]
    if extra:
        raise ValueError(f"{where} holds an array at {extra[0]} that this run's state lacks: "
                         "it was written by a run with another estimator, optimizer or task")


def _check_like(arrays: PyTree, target: PyTree, step: int, directory: Path) -> None:
    got = jax.tree_util.tree_structure(arrays)
    want = jax.tree_util.tree_structure(target)
    if got != want:
        raise ValueError(f"the checkpoint of step {step} in {directory} has structure {got}, "
                         f"this run's state has {want}")
    for a, b in zip(jax.tree_util.tree_leaves(arrays), jax.tree_util.tree_leaves(target),
                    strict=True):
        if np.shape(a) != b.shape or a.dtype != b.dtype:
            raise ValueError(f"the checkpoint of step {step} in {directory} holds an array "
                             f"{a.dtype}{list(np.shape(a))} where this run has "
                             f"{b.dtype}{list(b.shape)}")
