"""Helpers for Systems whose simulator runs on the host (C libraries, Python simulators).

A System's state must be a JAX pytree, and its ``step`` runs inside the estimators' ``jit``,
``lax.scan`` and ``vmap`` over particles. A simulator on the host is reached through
``jax.pure_callback``; two things make that fast and exact:

* **Batching.** Under ``vmap`` a callback should be called once for the whole batch, not once
  per particle. :func:`batch_callback` does that (``vmap_method="broadcast_all"``) and hands
  the host function arrays ``[B, ...]`` whatever the number of nested ``vmap`` levels (pairs,
  members): row ``i`` of every argument belongs to the same particle, and the function returns
  row ``i`` of every result for it. Outside ``vmap``, B = 1. Rows keep their order from call
  to call while the batch's shape stays the same, so row ``i`` may be served by the same host
  object every step (a cache, never the source of truth: see below).
  :func:`batch_cond` runs a function (typically a :func:`host_call`) only on steps where at
  least one particle asks for it (a reset, say), decided for the whole batch at once.
* **State in float64 bits.** Simulators integrate in float64; JAX computes in float32 unless
  ``jax_enable_x64`` is set. Carrying the simulator's state as the *bits* of its float64
  numbers (:func:`to_bits`, two uint32 per number) keeps it exact across the trip through JAX,
  so the state in JAX determines the simulator's state completely: particles can be copied
  (resets by selection), checkpointed and resumed, and a trajectory equals the simulator's own
  run to the last bit. :func:`float32_to_bits64` builds such bits from float32 numbers inside
  JAX (a reset drawn in JAX).

The rule that keeps a host System correct under every estimator: ``step``'s result must be a
function of its inputs alone (the state in JAX, theta, t, key), never of what the host
remembers. Host objects may cache (skip restoring a state they already hold), but must
restore from the JAX state whenever it differs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["to_bits", "from_bits", "float32_to_bits64", "batch_callback", "batch_cond",
           "host_call"]


def to_bits(x: np.ndarray) -> np.ndarray:
    """float64 [..., n] -> uint32 [..., 2n], the same bytes (exact round trip)."""
    return np.ascontiguousarray(x, np.float64).view(np.uint32)


def from_bits(bits: Any) -> np.ndarray:
    """uint32 [..., 2n] -> float64 [..., n], the inverse of :func:`to_bits`."""
    return np.ascontiguousarray(bits, np.uint32).view(np.float64)


def float32_to_bits64(x: jax.Array) -> jax.Array:
    """float32 [..., n] -> uint32 [..., 2n]: the bits of float64(x) as :func:`to_bits` lays
    them out (little-endian: low word first), in JAX without 64-bit types. Exact for zeros and
    normal numbers (the exponent is rebiased 127 -> 1023, the mantissa shifted by 29 bits);
    float32 subnormals are not handled (the callers never produce them)."""
    b = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    sign = b & jnp.uint32(0x80000000)
    exp = (b >> 23) & jnp.uint32(0xFF)
    man = b & jnp.uint32(0x7FFFFF)
    hi = sign | ((exp + jnp.uint32(1023 - 127)) << 20) | (man >> 3)
    lo = (man & jnp.uint32(7)) << 29
    zero = exp == 0
    hi = jnp.where(zero, sign, hi)
    lo = jnp.where(zero, jnp.uint32(0), lo)
    return jnp.stack([lo, hi], axis=-1).reshape(x.shape[:-1] + (2 * x.shape[-1],))


# ------------------------------------------------------------------- the host call itself
#
# jax.pure_callback moves its arguments onto a CPU device as jax.Arrays before calling
# (device_put, ~0.1 ms per call) and back to NumPy: about 0.2 ms of CPU per call, as much as
# simulating several MuJoCo environments. The primitive below emits the same XLA host call
# (JAX's own emit_python_callback) but hands the host function the NumPy views XLA passes, ten
# times cheaper (benchmarks/README.md). It uses JAX internals; where they are missing (another
# JAX version) or FAST is False, jax.pure_callback(vmap_method="broadcast_all") is used: the
# same results, slower.

FAST = True


@functools.cache
def _primitive():
    """The 'pes_host_call' primitive, or None where JAX's internals differ."""
    try:
        from jax._src import callback as jax_callback
        from jax._src import core as jax_core
        from jax._src import dispatch
        from jax._src.interpreters import batching, mlir
        from jax.extend.core import Primitive
    except ImportError:
        return None
    needed = (getattr(jax_callback, "emit_python_callback", None),
              getattr(jax_callback, "_callback_op_sharding", None))
    if any(f is None for f in needed):
        return None
    # A lowering that captures a Python callable must not be cached; older JAX (0.6.1) cannot
    # be told so (no `cacheable`), and there the jax.pure_callback fallback is used.
    if "cacheable" not in inspect.signature(mlir.register_lowering).parameters:
        return None
    # returns_token appeared after JAX 0.8 (before, no token came back without one passed in).
    emit_kwargs = ({"returns_token": False} if "returns_token" in inspect.signature(
        jax_callback.emit_python_callback).parameters else {})
    prim = Primitive("pes_host_call")
    prim.multiple_results = True
    prim.def_impl(functools.partial(dispatch.apply_primitive, prim))
    prim.def_abstract_eval(
        lambda *avals, host, results: [jax_core.ShapedArray(s, d) for s, d in results])

    def lowering(ctx, *args, host, results):
        sharding = jax_callback._callback_op_sharding(ctx.module_context.axis_context, None,
                                                      ctx.avals_out)
        out, _, _ = jax_callback.emit_python_callback(
            ctx, lambda *xs: tuple(host(*xs)), None, list(args), ctx.avals_in, ctx.avals_out,
            has_side_effect=False, sharding=sharding, **emit_kwargs)
        return out

    mlir.register_lowering(prim, lowering, cacheable=False)

    def batch_rule(args, dims, *, host, results):
        # broadcast_all: every argument gets the batch as its leading dim.
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        args = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args, dims, strict=True)]
        res = tuple(((size,) + tuple(shape), dtype) for shape, dtype in results)
        out = prim.bind(*args, host=host, results=res)
        return out, [0] * len(out)

    batching.primitive_batchers[prim] = batch_rule
    return prim


def _host_call(host: Callable, results: list, *args: jax.Array) -> tuple:
    """host(*numpy args) -> tuple of numpy results, as one XLA host call; batched under vmap
    by broadcasting every argument to the batch (leading dims)."""
    prim = _primitive() if FAST else None
    if prim is None:
        return tuple(jax.pure_callback(host, tuple(results), *args,
                                       vmap_method="broadcast_all"))
    spec = tuple((tuple(r.shape), np.dtype(r.dtype)) for r in results)
    return tuple(prim.bind(*args, host=host, results=spec))


def _as_list(result_shape_dtypes) -> tuple[list, bool]:
    if isinstance(result_shape_dtypes, Sequence):
        return list(result_shape_dtypes), True
    return [result_shape_dtypes], False


def _flat_host(fn: Callable, core_ndims: list[int], results: list, lead_of: Callable):
    """Wrap fn so that it sees every argument as [B, ...] and may return [B, ...] results;
    the leading (batch) dims are restored on the way out."""

    def host(*xs):
        xs = [np.asarray(x) for x in xs]
        lead = lead_of(xs)
        batch = int(np.prod(lead, dtype=np.int64))
        flat = [x.reshape((batch,) + x.shape[x.ndim - nd:]) for x, nd in zip(xs, core_ndims,
                                                                           strict=True)]
        out = fn(*flat)
        outs = list(out) if len(results) > 1 or isinstance(out, tuple | list) else [out]
        return tuple(np.asarray(o, r.dtype).reshape(lead + tuple(r.shape))
                     for o, r in zip(outs, results, strict=True))

    return host


def batch_callback(fn: Callable, result_shape_dtypes: Any, *args: jax.Array):
    """``fn(*args)`` on the host, called once per step for a whole ``vmap`` batch.

    Args:
      fn: NumPy function; each argument arrives as [B, *shape] (B: all vmapped dims flattened,
        1 outside vmap) and each result must be [B, *result shape], row i for particle i.
      result_shape_dtypes: one ``jax.ShapeDtypeStruct`` per example (or a sequence of them).
      args: JAX arrays, per example.
    Returns the results per example (a tuple when result_shape_dtypes is a sequence).
    """
    results, many = _as_list(result_shape_dtypes)
    core = [jnp.ndim(a) for a in args]

    def lead_of(xs):
        return xs[0].shape[:xs[0].ndim - core[0]]

    host = _flat_host(fn, core, results, lead_of)
    out = _host_call(host, results, *args)
    return tuple(out) if many else out[0]


def host_call(fn: Callable, result_shape_dtypes: Any, *args: jax.Array):
    """``fn(*args)`` on the host as one call, the arrays as they are (NumPy in and out); for
    code that already handles a whole batch, such as the ``fn`` of :func:`batch_cond`. Under
    ``vmap`` the batch becomes a leading dim of every argument and result."""
    results, many = _as_list(result_shape_dtypes)

    def host(*xs):
        out = fn(*(np.asarray(x) for x in xs))
        outs = list(out) if many else [out]
        return tuple(np.asarray(o, r.dtype).reshape(r.shape)
                     for o, r in zip(outs, results, strict=True))

    out = _host_call(host, results, *args)
    return tuple(out) if many else out[0]


def batch_cond(pred: jax.Array, fn: Callable, operand: Any) -> Any:
    """``fn(pred, operand)`` if ``pred`` (a bool scalar per example) holds for at least one
    example of the whole ``vmap`` batch, else ``operand`` unchanged: one decision per step for
    all particles, over every nested vmap level together (a ``lax.cond`` inside a vmapped
    function becomes a select that always runs both branches).

    ``fn`` sees the whole batch: ``pred`` of shape ``lead`` and every leaf of ``operand`` of
    shape ``lead + shape`` (lead: the vmapped dims, () outside vmap); it returns the operand's
    structure and shapes, and should change only the examples where pred holds. Use it for a
    host call (:func:`host_call`) that only some steps need, e.g. resets.
    """

    @jax.custom_batching.custom_vmap
    def call(p, x):
        return jax.lax.cond(jnp.any(p), lambda: fn(p, x), lambda: x)

    @call.def_vmap
    def _batched(axis_size, in_batched, p, x):
        # One more vmap level: make it a leading dim of everything and call again, so the
        # next level up (or the unbatched call) sees the whole batch.
        def lift(v, b):
            return v if b else jnp.broadcast_to(v, (axis_size,) + jnp.shape(v))

        p = lift(p, in_batched[0])
        x = jax.tree_util.tree_map(lift, x, in_batched[1])
        out = call(p, x)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return call(jnp.asarray(pred, bool), operand)
