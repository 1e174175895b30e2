"""A user's System as a run's task: ``pes run path/to/problem.py:make_system -e pes`` or
``pes run package.module:make_system -e pes``.

The spec names a factory, a function called with no arguments, which returns one of:

- a System (``init``, ``step``, ``horizon``; theta0 from its ``theta0`` attribute or method,
  else ``--theta0`` is required);
- a tuple ``(system, theta0)`` or ``(system, theta0, defaults)``;
- a :class:`UserTask` (system, theta0 and default settings).

theta may be an array or a pytree of arrays; runs see it as one flat float32 vector
(``jax.flatten_util.ravel_pytree``'s order) when it is not a single array. A run's
evaluation is the mean per-step loss of ``eval_episodes`` unperturbed episodes of
``eval_steps`` steps (the horizon by default), logged as ``meta_loss``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from pes.runs.errors import ConfigError
from pes.system import check_system, running_stats, unroll
from pes.tasks.base import OptimizerSpec, TaskDefaults

_IDENT = r"[A-Za-z_]\w*"
_MODULE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_FUNCTION = re.compile(rf"^{_IDENT}$")
# Settings a UserTask's ``defaults`` may give (``K`` is truncation_length).
DEFAULT_KEYS = ("num_particles", "sigma", "K", "truncation_length", "lr", "optimizer",
                "num_steps", "eval_every", "eval_steps", "eval_episodes")
# Estimators a user task offers (those needing episodes only with a horizon); also the arms
# of ``pes compare SPEC``.
ES_ESTIMATORS = ("pes", "tes", "nres", "full-es")
BACKPROP_ESTIMATORS = ("tbptt", "full-bptt", "rtrl", "uoro")


@dataclass
class UserTask:
    """What a factory may return: ``system`` (a pes.System), ``theta0`` (its initial theta,
    an array or pytree; None: the system's own ``theta0``, else ``--theta0``), and
    ``defaults``: settings that flags override, among num_particles (20), sigma (0.1),
    K (min(10, horizon)), lr (0.01), optimizer ('adam'), num_steps (100), eval_every
    (num_steps // 100), eval_steps (the horizon; required without one) and eval_episodes (4).
    """

    system: Any
    theta0: Any = None
    defaults: dict[str, Any] = field(default_factory=dict)


def split_spec(name: Any) -> tuple[str, str] | None:
    """``(target, function)`` of ``FILE.py:fn`` or ``package.module:fn``, else None."""
    if not isinstance(name, str) or name.startswith("gym:") or name.count(":") < 1:
        return None
    target, _, function = name.rpartition(":")
    if not _FUNCTION.match(function) or not target:
        return None
    if target.endswith(".py") or _MODULE.match(target):
        return target, function
    return None


def is_user_spec(name: Any) -> bool:
    return split_spec(name) is not None


def normalize_spec(name: str) -> str:
    """A file spec with its path made absolute (so that ``--resume`` finds the file from any
    folder); a module spec unchanged."""
    target, function = split_spec(name)  # type: ignore[misc]
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{function}"
    return name


def slug(name: str) -> str:
    """A folder name for a spec's default output: 'problem-make_system'."""
    target, function = split_spec(name)  # type: ignore[misc]
    stem = Path(target).stem if target.endswith(".py") else target
    return f"{stem}-{function}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _where(e: BaseException, path: str | None) -> str:
    """' (line N)' of the deepest traceback frame in ``path``, if any."""
    if path is None:
        return ""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if Path(f.filename).resolve() == Path(path).resolve()]
    return f" (line {lines[-1]})" if lines else ""


def _import_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file.name}: no such file", field="task")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"pes_user_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(file.resolve().parent))  # the file's own sibling imports
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except SyntaxError as e:
        raise ConfigError(f"{file.name} (line {e.lineno}): SyntaxError: {e.msg}",
                          field="task") from None
    except Exception as e:  # noqa: BLE001 - anything the user's module raises
        raise ConfigError(f"{file.name}{_where(e, path)}: importing it raised {_first_line(e)}",
                          field="task") from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    sys.modules[module_name] = module
    return module


def _import_module(name: str) -> Any:
    added = "" not in sys.path and "." not in sys.path
    if added:
        sys.path.insert(0, "")  # the current folder, as `python -m` has it
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"module {name!r} cannot be imported: {e}", field="task") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"module {name!r}: importing it raised {_first_line(e)}",
                          field="task") from None
    finally:
        if added:
            sys.path.remove("")


def load_factory_result(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """Import the spec's module, call its factory: ``(system, theta0 or None, defaults)``,
    or a one-line ConfigError naming the file (or module) and the problem."""
    target, function = split_spec(name)  # type: ignore[misc]
    is_file = target.endswith(".py")
    module = _import_file(target) if is_file else _import_module(target)
    where = Path(target).name if is_file else f"module {target!r}"
    factory = getattr(module, function, None)
    if not callable(factory):
        what = "no attribute" if factory is None else "a non-callable"
        raise ConfigError(f"{where}: has {what} {function!r} (the factory must be a function "
                          "taking no arguments)", field="task")
    try:
        result = factory()
    except Exception as e:  # noqa: BLE001
        file = target if is_file else getattr(module, "__file__", None)
        raise ConfigError(f"{where}: {function}() raised {_first_line(e)}{_where(e, file)}",
                          field="task") from None
    return _unpack(result, f"{where}: {function}()")


def _unpack(result: Any, who: str) -> tuple[Any, Any, dict[str, Any]]:
    if isinstance(result, UserTask):
        system, theta0, defaults = result.system, result.theta0, dict(result.defaults)
    elif isinstance(result, tuple) and len(result) in (2, 3):
        system, theta0 = result[:2]
        defaults = dict(result[2]) if len(result) == 3 else {}
    else:
        system, theta0, defaults = result, None, {}
    missing = [n for n in ("init", "step") if not callable(getattr(system, n, None))]
    missing += [] if hasattr(system, "horizon") else ["horizon"]
    if missing:
        raise ConfigError(f"{who} returned {type(result).__name__}, which is not a System (it "
                          f"lacks {', '.join(missing)}); return a System, (system, theta0) or "
                          "pes.runs.UserTask(system, theta0, defaults)", field="task")
    try:
        check_system(system)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{who}: {e}", field="task") from None
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ConfigError(f"{who}: unknown default setting {unknown[0]!r}; known: "
                          f"{', '.join(DEFAULT_KEYS)}", field="task")
    for key, value in defaults.items():
        _check_default(who, key, value)
    if theta0 is None:
        own = getattr(system, "theta0", None)
        theta0 = own() if callable(own) else own
    return system, theta0, defaults


def _check_default(who: str, key: str, value: Any) -> None:
    """A ConfigError for a default setting of the wrong type or range."""
    if key == "optimizer":
        ok = value in ("sgd", "adam")
        want = "'sgd' or 'adam'"
    elif key in ("sigma", "lr"):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        want = "a number > 0"
    else:
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1
        want = "an integer >= 1"
    if not ok:
        raise ConfigError(f"{who}: default {key}={value!r} must be {want}", field="task")


class FlatStats:
    """A System's running-statistics hook (:func:`pes.system.running_stats`) on the flat theta
    the command line trains: ``get``/``put`` through the theta's unravel."""

    def __init__(self, hook: Any, unravel: Any):
        self.hook, self.unravel = hook, unravel

    def observe(self, state: Any) -> Any:
        return self.hook.observe(state)

    def get(self, theta: jax.Array) -> Any:
        return self.hook.get(self.unravel(theta))

    def put(self, theta: jax.Array, stats: Any) -> jax.Array:
        return ravel_pytree(self.hook.put(self.unravel(theta), stats))[0]


class UserSystemTask:
    """A user's System as a task over a flat theta vector [D] (or its own array theta)."""

    def __init__(self, name: str):
        self.name = name
        system, theta0, defaults = load_factory_result(name)
        self.system, self.user_defaults = system, defaults
        self.horizon = check_system(system)
        self.theta0_required = theta0 is None
        self._unravel = None
        if theta0 is not None:
            leaves = jax.tree_util.tree_leaves(theta0)
            if len(leaves) == 1 and not isinstance(theta0, dict | list | tuple):
                self.theta0 = jnp.asarray(theta0, jnp.float32)
            else:
                flat, self._unravel = ravel_pytree(
                    jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), theta0))
                self.theta0 = flat
        self.eval_steps = int(defaults.get("eval_steps") or self.horizon or 0)
        if not self.eval_steps:
            raise ConfigError(f"{name}: the system never resets (horizon None); give "
                              "defaults={'eval_steps': T} for its evaluation", field="task")
        self.eval_episodes = int(defaults.get("eval_episodes", 4))
        self.default_eval_every = defaults.get("eval_every")
        hook = running_stats(system)
        self.running_stats = (hook if hook is None or self._unravel is None
                              else FlatStats(hook, self._unravel))

    def _theta(self, theta: jax.Array) -> Any:
        return theta if self._unravel is None else self._unravel(theta)

    def init(self, key: jax.Array) -> Any:
        return self.system.init(key)

    def step(self, state: Any, theta: jax.Array, t: jax.Array, key: jax.Array):
        return self.system.step(state, self._theta(theta), t, key)

    def evaluate(self, theta: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        """Mean per-step loss of ``eval_episodes`` unperturbed episodes: {'meta_loss': []}."""
        keys = jax.random.split(key, self.eval_episodes)
        losses = jax.vmap(lambda k: unroll(self, theta, k, self.eval_steps)[1])(keys)
        return {"meta_loss": jnp.mean(losses)}

    def defaults(self) -> TaskDefaults:
        d = self.user_defaults
        k = int(d.get("K", d.get("truncation_length", min(10, self.horizon or 10))))
        es = {"num_particles": int(d.get("num_particles", 20)),
              "sigma": float(d.get("sigma", 0.1)), "truncation_length": k}
        names = [n for n in ES_ESTIMATORS + BACKPROP_ESTIMATORS
                 if self.horizon is not None or n not in ("nres", "full-es", "full-bptt")]
        settings = {n: ({"num_particles": es["num_particles"], "sigma": es["sigma"]}
                        if n == "full-es" else {} if n == "full-bptt"
                        else dict(es) if n in ES_ESTIMATORS
                        else {"truncation_length": k}) for n in names}
        theta0 = np.zeros(()) if self.theta0_required else np.asarray(self.theta0)
        return TaskDefaults(
            theta0=float(theta0) if theta0.ndim == 0 else tuple(float(v) for v in theta0.ravel()),
            theta_shape=None if theta0.ndim <= 1 else theta0.shape,
            num_steps=int(d.get("num_steps", 100)),
            optimizer=OptimizerSpec(str(d.get("optimizer", "adam")), float(d.get("lr", 0.01))),
            estimators=settings)


@functools.cache
def make_user_task(name: str) -> UserSystemTask:
    return UserSystemTask(name)
