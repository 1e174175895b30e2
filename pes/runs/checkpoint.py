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
requires, and ``DIR`` must be on a filesystem they all see). Only the last
``max_to_keep`` checkpoints are kept. Writes are asynchronous by default: ``save`` copies the
arrays to host memory and returns while a background thread writes them (``wait`` blocks until
the last one is on disk; ``close`` waits too).

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

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

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

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
                 asynchronous: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        # Several processes (a distributed run) share the folder: one cleans it, all wait.
        self.removed = remove_partial_writes(self.directory) if jax.process_index() == 0 \
            else []
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"pes-checkpointer-open:{self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=False, enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=ITEMS)

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
        saved = self._manager.save(
            step, force=True,
            args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                    meta=ocp.args.JsonSave(meta)))
        if not saved:
            raise RuntimeError(f"orbax did not write the checkpoint of step {step} in "
                               f"{self.directory}")
        return True

    def wait(self) -> None:
        """Block until every checkpoint written so far is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending writes and release the manager's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        try:
            saved = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise ValueError(f"the checkpoint of step {step} in {self.directory} cannot be "
                             f"read: {type(e).__name__}: {e}") from None
        _check_signature(saved.get("arrays"), _signature(target), step, self.directory)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                              meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax's errors: a missing or damaged file
            why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            why = why if len(why) <= 300 else why[:297] + "..."
            raise ValueError(f"the checkpoint of step {step} in {self.directory} cannot be "
                             f"restored into this run's state: {why or type(e).__name__}"
                             ) from None
        arrays, meta = restored.state, dict(restored.meta)
        meta.pop("arrays", None)
        _check_like(arrays, target, step, self.directory)
        state = TrainState(arrays["theta"], arrays["opt_state"], arrays["estimator_state"],
                           int(meta["step"]), int(meta["inner_steps"]))
        return state, arrays["key"], meta


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
