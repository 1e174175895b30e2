"""``pes diagnose``: bias, normalised variance and cost of estimators on a task, by K.

For each estimator and truncation length K, at the task's initial theta (its ``defaults()``),
:func:`run_diagnose` calls :func:`pes.diagnostics.diagnose` and tabulates the result. The
protocol is the variance study's (:mod:`pes.paper.variance_study`), so that every estimator
and every K aims at one target at one cost:

* an *episode* of T steps from ``task.init``: T is the task's horizon, or ``episode_length``
  for a task that never resets (influence-balancing; default the smallest multiple of every
  K that is >= 100). Every K must divide T;
* one estimate is the mean of the T/K consecutive windows of one episode, run by a fresh,
  non-staggered estimator (all particles in lockstep from t = 0): an estimate of the gradient
  of the episode's mean loss, costing N x T inner steps whatever K is. full-es and full-bptt
  have no K: one row each, one whole episode per estimate;
* the reference is the gradient of the Gaussian-smoothed episode loss
  (:func:`pes.diagnostics.reference_gradient`, 'autodiff' or 'es'), at the estimator's sigma
  (one reference per distinct sigma; sigma 0, the plain gradient, for the backprop
  estimators unless the reference is 'es'), so that an estimator is judged against the
  gradient it should be unbiased for;
* a point is marked *biased* when its bias is significant: ``bias_chi2_z`` > 5 (the
  standardised mean of (b_i / se_i)^2, about N(0, 1) without bias), or, when that is
  undefined (fewer than 6 replicates), max_i |b_i| / se_i > 4; and |b| / |g_ref| > 1e-4
  (a deterministic estimator's float32 round-off is "significant" but no bias).

Writes ``diagnose.json`` (settings, references, one row per point with every
:class:`~pes.diagnostics.Diagnosis` field), ``diagnose.md`` (the table) and ``diagnose.png``
(normalised variance against K, log-log, one line per estimator, biased points hollow) into a
run directory (default ``runs/diagnose/TASK``).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pes.diagnostics import REFERENCE_METHODS, Reference, diagnose, reference_gradient
from pes.runs.config import RunConfig, make_task
from pes.runs.errors import ConfigError
from pes.runs.registry import ESTIMATOR_NAMES, get_estimator, get_task, unknown_name
from pes.runs.run import remove_entries, write_json
from pes.runs.user_task import is_user_spec, slug

DIAGNOSE_JSON = "diagnose.json"
DIAGNOSE_MD = "diagnose.md"
DIAGNOSE_PNG = "diagnose.png"
DIAGNOSE_FILES = (DIAGNOSE_JSON, DIAGNOSE_MD, DIAGNOSE_PNG)
BIAS_Z = 5.0  # bias_chi2_z above this: biased
BIAS_Z_MAX = 4.0  # max_i |b_i| / se_i above this, when bias_chi2_z is undefined
PLOT_FLOOR = 1e-4  # the plot's y axis starts at this fraction of the largest variance
MIN_RELATIVE_BIAS = 1e-4  # and |b| / |g_ref| above this (below: float32 round-off)
DEFAULT_MIN_EPISODE = 100
# Replicate lanes (replicates x particles) per vmapped call, to bound memory.
MAX_LANES = 1 << 15


@dataclass(frozen=True)
class DiagnoseConfig:
    """Settings of ``pes diagnose``.

    task, estimators: registry names. truncation_lengths: the K values (None: each
    estimator's default K on the task). num_replicates: R estimates per point.
    num_particles, sigma: override the task's defaults (sigma for ES estimators only).
    reference: 'autodiff' or 'es'; reference_samples: its antithetic pairs. episode_length:
    T for a task that never resets (refused for one that does). seed: all keys. out: the
    run directory; overwrite: replace a previous diagnosis there.
    """

    task: str
    estimators: tuple[str, ...]
    truncation_lengths: tuple[int, ...] | None = None
    num_replicates: int = 32
    num_particles: int | None = None
    sigma: float | None = None
    reference: str = "autodiff"
    reference_samples: int = 128
    episode_length: int | None = None
    seed: int = 0
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        get_task(self.task)
        ests = tuple(self.estimators)
        if not ests:
            raise ConfigError("estimators is empty; valid estimators: "
                              + ", ".join(ESTIMATOR_NAMES), field="estimators")
        for name in ests:
            if name not in ESTIMATOR_NAMES:
                raise unknown_name("estimators", name, "estimator", ESTIMATOR_NAMES)
        if len(set(ests)) != len(ests):
            raise ConfigError(f"estimators={','.join(ests)} names one twice",
                              field="estimators")
        object.__setattr__(self, "estimators", ests)
        if self.truncation_lengths is not None:
            ks = tuple(self.truncation_lengths)
            if not ks:
                raise ConfigError("truncation_lengths is empty", field="truncation_lengths")
            for k in ks:
                _check_int("truncation_lengths", k, 1)
            object.__setattr__(self, "truncation_lengths", tuple(dict.fromkeys(ks)))
        _check_int("num_replicates", self.num_replicates, 2)
        _check_int("reference_samples", self.reference_samples, 2)
        if self.episode_length is not None:
            _check_int("episode_length", self.episode_length, 1)
        if self.reference not in REFERENCE_METHODS:
            raise ConfigError(f"reference={self.reference!r} is not known; valid references: "
                              + ", ".join(REFERENCE_METHODS), field="reference")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["estimators"] = list(self.estimators)
        if self.truncation_lengths is not None:
            out["truncation_lengths"] = list(self.truncation_lengths)
        return out


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}", field=name)
    return int(value)


@dataclass(frozen=True)
class _Point:
    """One (estimator, K) to diagnose: its resolved RunConfig and constructor kwargs."""

    name: str
    truncation_length: int | None
    windows: int
    kwargs: dict[str, Any]
    sigma: float | None


@dataclass
class DiagnoseResult:
    """rows: one dict per point (estimator, K, windows, biased, reference_sigma, wall_time_s
    and the Diagnosis fields); references: by sigma; notes: lines for the reader."""

    config: DiagnoseConfig
    out_dir: Path
    episode_length: int
    theta_dim: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    files: list[Path] = field(default_factory=list)
    table: str = ""


def _resolve(config: DiagnoseConfig, task: Any) -> tuple[int, list[_Point], list[str]]:
    """The episode length T, the points and the notes; every refusal before any work."""
    horizon = task.horizon
    ks = config.truncation_lengths
    if horizon is None:
        if config.episode_length is not None:
            T = config.episode_length
        else:
            base = math.lcm(*ks) if ks else 1
            T = base * max(1, math.ceil(DEFAULT_MIN_EPISODE / base))
    else:
        if config.episode_length is not None and config.episode_length != horizon:
            raise ConfigError(
                f"episode_length={config.episode_length} contradicts task={config.task!r}: its "
                f"episodes have {horizon} steps (episode_length is for tasks that never reset)",
                field="episode_length")
        T = horizon
    points: list[_Point] = []
    notes: list[str] = []
    for name in config.estimators:
        est = get_estimator(name, "estimators")
        if not est.available():
            est.cls()  # the ConfigError saying this installation lacks it
        windowed = "truncation_length" in est.params
        if not windowed:
            if ks is not None:
                notes.append(f"{name} unrolls whole episodes: --truncation-lengths does not "
                             f"apply to it (one row, K = T = {T})")
            k_list: Sequence[int | None] = [None]
        else:
            k_list = ks if ks is not None else [None]
        for k in k_list:
            run = RunConfig(
                task=config.task, estimator=name, seed=config.seed,
                num_particles=config.num_particles if "num_particles" in est.params else None,
                sigma=config.sigma if "sigma" in est.params else None,
                truncation_length=k).resolve()
            kwargs = run.estimator_kwargs()
            K = kwargs.get("truncation_length")
            if windowed and T % K:
                raise ConfigError(
                    f"truncation_length={K} ({name}) does not divide the episode length T={T}: "
                    "each estimate is the mean of the T/K windows of one episode",
                    field="truncation_lengths")
            points.append(_Point(name, K if windowed else None, T // K if windowed else 1,
                                 kwargs, kwargs.get("sigma")))
    if config.sigma is not None and all(p.sigma is None for p in points):
        notes.append(f"--sigma {config.sigma:g} applies only to ES estimators; none was chosen")
    return T, points, notes


def _make_estimator(name: str, task: Any, kwargs: dict[str, Any]) -> Any:
    cls = get_estimator(name).cls()
    params = inspect.signature(cls).parameters
    # A diagnosis estimates from fresh episodes in lockstep, whatever the task's runs use.
    if "stagger" in params:
        kwargs = {**kwargs, "stagger": False}
    return cls(task, **kwargs)


def _is_biased(d: dict[str, Any]) -> bool:
    if not (d.get("relative_bias") or 0.0) > MIN_RELATIVE_BIAS:
        return False  # float32 round-off, however significant
    z = d.get("bias_chi2_z")
    if z is not None and not math.isnan(z):
        return bool(z > BIAS_Z)
    zm = d.get("bias_z_max")
    return bool(zm is not None and not math.isnan(zm) and zm > BIAS_Z_MAX)


def prepare_out_dir(path: Path, overwrite: bool) -> Path:
    """An empty (or new) directory; a previous diagnosis (with diagnose.json) is replaced only
    with ``overwrite``, and only its files are removed."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={str(path)!r} exists and is not a directory", field="out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"out={str(path)!r} already exists and is not empty; pass "
                              "--overwrite to replace that diagnosis, or choose another --out",
                              field="out")
        if not (path / DIAGNOSE_JSON).is_file():
            raise ConfigError(f"out={str(path)!r} is not empty and is not a pes diagnose "
                              f"directory (no {DIAGNOSE_JSON}); refusing to delete anything in "
                              "it", field="out")
        remove_entries(path, DIAGNOSE_FILES)
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line(config: DiagnoseConfig, out_dir: Path) -> str:
    cmd = f"pes diagnose {config.task} --estimators {','.join(config.estimators)}"
    if config.truncation_lengths is not None:
        cmd += f" --truncation-lengths {','.join(map(str, config.truncation_lengths))}"
    cmd += f" --replicates {config.num_replicates}"
    for flag, value in (("--num-particles", config.num_particles), ("--sigma", config.sigma),
                        ("--episode-length", config.episode_length)):
        if value is not None:
            cmd += f" {flag} {value:g}"
    if config.reference != "autodiff":
        cmd += f" --reference {config.reference}"
    if config.reference_samples != DiagnoseConfig.reference_samples:
        cmd += f" --reference-samples {config.reference_samples}"
    if config.seed:
        cmd += f" --seed {config.seed}"
    return cmd + f" --out {out_dir}"


def run_diagnose(config: DiagnoseConfig, *,
                 echo: Callable[[str], Any] | None = None) -> DiagnoseResult:
    """Diagnose every (estimator, K) of ``config`` and write the run directory.

    Setting mistakes raise ConfigError before anything is computed or written.
    """
    echo = echo or (lambda line: None)
    start = time.perf_counter()
    task = make_task(config.task, dict(get_task(config.task).options))
    T, points, notes = _resolve(config, task)
    theta = task.defaults().initial_theta()
    folder = slug(config.task) if is_user_spec(config.task) else config.task
    out_dir = Path(config.out) if config.out else Path("runs") / "diagnose" / folder
    prepare_out_dir(out_dir, config.overwrite)
    result = DiagnoseResult(config, out_dir, T, int(np.size(theta)), notes=notes)
    for line in notes:
        echo(f"note: {line}")

    root = jax.random.PRNGKey(config.seed)
    refs: dict[float, Reference] = {}
    es_sigmas = [p.sigma for p in points if p.sigma is not None]
    for ei, p in enumerate(points):
        if p.sigma is not None:
            ref_sigma = float(p.sigma)
        elif config.reference == "autodiff":
            ref_sigma = 0.0
        else:  # an ES reference needs sigma > 0: that of the ES estimators, or --sigma
            ref_sigma = float(config.sigma or (es_sigmas[0] if es_sigmas else 0.01))
        if ref_sigma not in refs:
            tic = time.perf_counter()
            ref = reference_gradient(task, theta, jax.random.fold_in(root, 0),
                                     method=config.reference, sigma=ref_sigma,
                                     num_samples=config.reference_samples, num_steps=T)
            refs[ref_sigma] = ref
            info = {**ref.to_dict(), "wall_time_s": time.perf_counter() - tic}
            result.references[f"{ref_sigma:g}"] = info
            echo(f"reference ({ref.method}, sigma={ref_sigma:g}, {ref.num_samples} pairs, "
                 f"T={T}): |g| = {info['norm']:.4g}, relative se "
                 f"{info.get('relative_se', float('nan')):.2g}, {info['wall_time_s']:.1f} s")
        tic = time.perf_counter()
        estimator = _make_estimator(p.name, task, p.kwargs)
        n = int(p.kwargs.get("num_particles", 1))
        batch = max(1, min(config.num_replicates, MAX_LANES // max(n, 1)))
        key = jax.random.fold_in(jax.random.fold_in(root, 1 + ei), p.truncation_length or 0)
        diag = diagnose(estimator, theta, key, reference=refs[ref_sigma],
                        num_replicates=config.num_replicates, windows=p.windows, name=p.name,
                        batch_size=batch)
        d = diag.to_dict()
        row = {"estimator": p.name, "K": p.truncation_length, "windows": p.windows,
               "reference_sigma": ref_sigma, **d, "biased": _is_biased(d),
               "wall_time_s": time.perf_counter() - tic}
        result.rows.append(row)
        echo(f"{p.name:>9} K={_k(row):<6} var={_g(row['normalized_variance'])} "
             f"+- {_g(row['normalized_variance_se'], 2)}  rel.bias="
             f"{_g(row['relative_bias'], 3)}{' (biased)' if row['biased'] else ''}  "
             f"{row['wall_time_s']:.1f} s")
    result.wall_time_s = time.perf_counter() - start
    write_outputs(result)
    return result


# ----------------------------------------------------------------------------- output


def _g(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _k(row: dict[str, Any]) -> str:
    return "-" if row["K"] is None else str(row["K"])


TABLE_HEADER = ("estimator", "K", "T/K", "bias |b| ± se", "rel. bias", "bias z",
                "norm. variance ± se", "inner steps / estimate")


def table_rows(result: DiagnoseResult) -> list[tuple[str, ...]]:
    out = []
    for r in result.rows:
        z = r["bias_chi2_z"] if r["bias_chi2_z"] is not None else r["bias_z_max"]
        out.append((
            r["estimator"], _k(r), str(r["windows"]),
            f"{_g(r['bias_norm'], 3)} ± {_g(r['bias_norm_se'], 2)}",
            _g(r["relative_bias"], 3) + (" *" if r["biased"] else ""),
            _g(z, 3),
            f"{_g(r['normalized_variance'], 4)} ± {_g(r['normalized_variance_se'], 2)}",
            f"{r['inner_steps']:,.0f}",
        ))
    return out


def format_table(result: DiagnoseResult) -> str:
    """The table as aligned plain text (for the terminal)."""
    rows = [TABLE_HEADER, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(result: DiagnoseResult) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return "\n".join(lines)


def write_outputs(result: DiagnoseResult) -> list[Path]:
    cfg, out = result.config, result.out_dir
    cmd = command_line(cfg, out)
    write_json(out / DIAGNOSE_JSON, {
        "task": cfg.task, "command": cmd, "config": cfg.to_dict(),
        "episode_length": result.episode_length, "theta_dim": result.theta_dim,
        "references": result.references, "rows": result.rows, "notes": result.notes,
        "wall_time_s": round(result.wall_time_s, 3),
    })
    png = plot_diagnose(result, out / DIAGNOSE_PNG)
    result.table = markdown_table(result)
    refs = "; ".join(
        f"sigma {s}: {r['method']}, {r['num_samples']} antithetic pairs, |g_ref| = "
        f"{_g(r['norm'])}, relative se {_g(r.get('relative_se'), 2)}"
        for s, r in result.references.items())
    lines = [
        f"# pes diagnose {cfg.task}",
        "",
        f"Command: `{cmd}` ({result.wall_time_s:.1f} s in all).",
        "",
        f"At the task's initial theta ({result.theta_dim} numbers). Each estimate is the mean "
        f"of the T/K windows of one episode of T = {result.episode_length} steps, run by a "
        "fresh non-staggered estimator; "
        f"{cfg.num_replicates} independent estimates per row. Reference: the gradient of the "
        f"Gaussian-smoothed episode loss at the estimator's sigma ({refs}).",
        "",
        "bias |b| = |mean g - g_ref| with its standard error; rel. bias = |b| / |g_ref| "
        f"(* : significant, bias z > {BIAS_Z:g}); bias z = the standardised mean of "
        "(b_i / se_i)^2, about N(0, 1) without bias; norm. variance = E|g - g_ref|^2 / "
        "|g_ref|^2 (counts the squared bias too).",
        "",
        result.table,
        "",
    ]
    if result.notes:
        lines += [f"Note: {n}." for n in result.notes] + [""]
    lines += [f"![normalised variance against K]({png.name})", ""]
    (out / DIAGNOSE_MD).write_text("\n".join(lines))
    result.files = [out / DIAGNOSE_JSON, out / DIAGNOSE_MD, png]
    return result.files


def plot_diagnose(result: DiagnoseResult, path: Path) -> Path:
    """Normalised variance against K, log-log, one line per estimator (error bars: one SE);
    biased points hollow and larger; estimators without K as a dashed horizontal line."""
    from pes.runs.plots import _colors, _figure, _save

    fig, axes = _figure(size=(6.5, 4.5))
    ax = axes[0, 0]
    names = list(dict.fromkeys(r["estimator"] for r in result.rows))
    colors = dict(zip(names, _colors(len(names)), strict=True))
    any_low = False
    ks = sorted({r["K"] for r in result.rows if r["K"] is not None})
    span = (min(ks), max(ks)) if ks else (1, result.episode_length)
    values = [_nan(r["normalized_variance"]) for r in result.rows]
    top = max((v for v in values if math.isfinite(v) and v > 0), default=1.0)
    floor = PLOT_FLOOR * top  # e.g. an exact gradient's ~1e-13: drawn at the floor as 'v'
    for name in names:
        rows = sorted((r for r in result.rows if r["estimator"] == name),
                      key=lambda r: r["K"] or 0)
        y = np.array([_nan(r["normalized_variance"]) for r in rows])
        se = np.array([_nan(r["normalized_variance_se"]) for r in rows])
        biased = np.array([r["biased"] for r in rows])
        if rows[0]["K"] is None:
            ax.axhline(y[0], color=colors[name], ls="--", lw=1.3,
                       label=f"{name} (whole episodes)" + (" [biased]" if biased[0] else ""))
            continue
        x = np.array([r["K"] for r in rows], float)
        low = y < floor
        y = np.where(low, floor, y)
        ax.errorbar(x, y, yerr=np.where(low, 0.0, np.minimum(se, 0.99 * y)),
                    color=colors[name], marker="o", ms=4, capsize=2, lw=1.4, label=name)
        if low.any():
            ax.plot(x[low], y[low], ls="none", marker="v", ms=9, color=colors[name], zorder=3)
            any_low = True
        if biased.any():
            ax.plot(x[biased], y[biased], ls="none", marker="o", ms=9, mfc="white",
                    mec=colors[name], zorder=3)
    if any_low:
        ax.plot([], [], ls="none", marker="v", ms=9, color="gray",
                label=f"below {PLOT_FLOOR:g} x the largest (drawn there)")
    if any(r["biased"] for r in result.rows):
        ax.plot([], [], ls="none", marker="o", ms=9, mfc="white", mec="gray",
                label=f"biased (bias z > {BIAS_Z:g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if span[0] == span[1]:
        ax.set_xlim(span[0] / 2, span[1] * 2)
    ax.set_xlabel("truncation length K")
    ax.set_ylabel(r"normalised variance $E|g - g_{ref}|^2 / |g_{ref}|^2$")
    ax.set_title(f"pes diagnose {result.config.task} (T = {result.episode_length}, "
                 f"{result.config.num_replicates} replicates)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)
