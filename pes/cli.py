"""The ``pes`` command line: a thin shell over :mod:`pes.paper` and :mod:`pes.runs`.

    pes list
    pes run TASK --estimator NAME [--seed S] [--num-steps N] [--out DIR] [settings...]
    pes run --config FILE [settings...]
    pes run --resume RUN_DIR [--num-steps N]
    pes run ... [--devices N] [--distributed [--coordinator-address H:P --num-processes N
                                              --process-id I]]
    pes compare EXPERIMENT [--seeds 0,1,2] [--num-steps N] [--out DIR]
    pes run/compare/diagnose FILE.py:FUNCTION ...  (your own System, docs/user-systems.md)
    pes run/compare ... --log tensorboard[,wandb,mlflow]    (experiment trackers)
    pes surface toy-regression [--resolution R] [--runs DIR...] [--out FILE]
    pes diagnose TASK --estimators pes,tes,... [--truncation-lengths 1,10,100] [--replicates R]
    pes compare variance [--size default|paper|tiny]

A setting a user gets wrong (unknown name, bad value, contradiction, existing run directory)
is one line on stderr and exit status 2; a run stopped by a non-finite gradient exits 1, one
stopped by SIGINT or SIGTERM 130 or 143 (both after checkpointing; ``--resume`` continues).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import typing
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer

from pes.paper import (
    EXPERIMENT_NAMES,
    EXPERIMENTS,
    CompareOptions,
    draw_surface,
    run_experiment,
)
from pes.paper.surface import surface_tasks
from pes.runs import (
    ESTIMATOR_NAMES,
    ESTIMATORS,
    TASK_NAMES,
    TASKS,
    ConfigError,
    RunConfig,
    RunFailed,
    RunInterrupted,
    execute_run,
    resume_run,
    tracking,
)

app = typer.Typer(
    name="pes",
    help="Persistent Evolution Strategies and its rivals: run, compare and inspect gradient "
    "estimators on the paper's tasks.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors():
    try:
        yield
    except ConfigError as e:
        _fail(str(e))


@contextmanager
def _tracking(log: str | None):
    """--log for every run inside (pes compare's); a bad or missing tracker exits 2."""
    try:
        scope = tracking(log)
        scope.__enter__()
    except ConfigError as e:
        _fail(str(e))
    try:
        yield
    finally:
        scope.__exit__(None, None, None)


def _names(names) -> str:
    return ", ".join(names)


def _version(value: bool) -> None:
    if value:
        import pes

        typer.echo(f"pes {pes.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Persistent Evolution Strategies and its rivals on the paper's tasks."""
    _one_line_warnings()
    import logging

    # orbax logs a failed or damaged checkpoint through absl (bytes and tracebacks included);
    # the run layer reports each such failure as one line of its own.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    from pes.runs import compile_cache

    compile_cache.enable()  # unless $PES_NO_COMPILE_CACHE; --no-compile-cache undoes it


def disable_compile_cache() -> None:
    from pes.runs import compile_cache

    compile_cache.disable()


def _one_line_warnings() -> None:
    """The run layer's warnings (RunWarning: a stale lock taken over, a damaged checkpoint
    skipped) as one 'Warning: ...' line on stderr; others as Python prints them."""
    import warnings

    from pes.runs.errors import RunWarning

    default = getattr(warnings.showwarning, "_pes_default", warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, RunWarning):
            typer.echo(f"Warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    show._pes_default = default  # type: ignore[attr-defined]
    warnings.showwarning = show


@app.command("list")
def list_command() -> None:
    """List the tasks, estimators and experiments, one line each."""
    typer.echo("tasks (pes run TASK):")
    width = max(map(len, TASK_NAMES + ESTIMATOR_NAMES + EXPERIMENT_NAMES))
    for name, entry in TASKS.items():
        typer.echo(f"  {name:<{width}}  {entry.description}")
    typer.echo("estimators (pes run TASK --estimator NAME):")
    for name, est in ESTIMATORS.items():
        note = "" if est.available() else f" [not available: pes.{est.attr} is missing]"
        typer.echo(f"  {name:<{width}}  {est.description}{note}")
    typer.echo("experiments (pes compare EXPERIMENT):")
    for name, exp in EXPERIMENTS.items():
        arms = ", ".join(exp.arm_labels())
        typer.echo(f"  {name:<{width}}  {exp.title}: {arms}")


# Options of the image tasks (mnist-lr-schedule, many-hyperparameters), on run and compare.
_DATA_DIR = dict(metavar="DIR", show_default=False,
                 help="Image tasks: the folder holding the dataset's IDX files, the only one "
                 "searched when given (else $PES_DATA_DIR, else $PES_CACHE_DIR; with none, "
                 "/usr/share/datasets/fashion-mnist, then the download cache).")
_DATASET = dict(show_default=False,
                help="Image tasks: fashion-mnist or mnist. [default: fashion-mnist]")
_LOG = dict(metavar="TRACKERS", show_default=False,
            help="Also log to experiment trackers, comma-separated: tensorboard, wandb, mlflow "
            "(files inside each run directory; wandb offline unless WANDB_API_KEY is set). "
            "Each needs its extra, e.g. pip install 'pes[tensorboard]'.")
_RESET_HELP = ("Tasks whose episodes end early (gym:ENV_ID): slot restarts a pair of "
               "particles when its clock reaches the horizon (PES, NRES, full ES exactly "
               "unbiased); pair restarts it as soon as both members' episodes have ended "
               "(faster; another expectation: docs/termination.md). [default: slot]")
_SIZE = dict(show_default=False,
             help="Image tasks: cpu (minutes on 2 cores), paper (the paper's), tiny "
             "(seconds; tests), or full (learned-optimizer at 28x28). [default: cpu]")
_OBJECTIVE = dict(show_default=False,
                  help="mnist-lr-schedule: loss (mean training loss) or accuracy (minus "
                  "validation accuracy). [default: loss; pes compare: both]")


def dataclass_command(typer_app: typer.Typer, name: str, options: type):
    """Register ``fn(opts)`` as the command ``name`` whose parameters are the fields of the
    dataclass ``options`` (each annotated with its typer.Argument/Option, in order): typer sees
    one parameter per field, ``fn`` gets them as one ``options`` instance."""
    hints = typing.get_type_hints(options, include_extras=True)
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                annotation=hints[f.name]) for f in dataclasses.fields(options)]

    def register(fn):
        wants_order = "order" in inspect.signature(fn).parameters

        @functools.wraps(fn)
        def command(_ctx: typer.Context, **values):
            opts = options(**values)
            # click fills ctx.params in command-line order (then the parameters not given).
            return fn(opts, order=list(_ctx.params)) if wants_order else fn(opts)

        del command.__wrapped__  # typer must see the fields, not fn's signature
        ctx = inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        command.__signature__ = inspect.Signature([ctx, *params])
        command.__annotations__ = {p.name: p.annotation for p in (ctx, *params)}
        typer_app.command(name)(command)
        return fn

    return register


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The arguments of ``pes run``, as typer reads them (see :func:`dataclass_command`)."""

    task: Annotated[str | None, typer.Argument(
        help=f"Task: {_names(TASK_NAMES)}, or gym:ENV_ID (any gymnasium environment, e.g. "
        "gym:Hopper-v5), or your System's factory, FILE.py:FUNCTION or package.module:FUNCTION "
        "(docs/user-systems.md). [default: from --config or --resume]",
        show_default=False)] = None
    estimator: Annotated[str | None, typer.Option(
        "--estimator", "-e", help=f"Estimator: {_names(ESTIMATOR_NAMES)}.",
        show_default=False)] = None
    seed: Annotated[int | None, typer.Option(help="PRNG seed (>= 0). [default: 0]",
                                             show_default=False)] = None
    num_steps: Annotated[int | None, typer.Option(
        help="Outer steps (with --resume: may extend the run). [default: the task's for this "
        "estimator]", show_default=False)] = None
    out: Annotated[str | None, typer.Option(
        help="Run directory. [default: runs/TASK/ESTIMATOR-seedS]", show_default=False)] = None
    num_particles: Annotated[int | None, typer.Option(
        help="Particles N (even for ES estimators). [default: the task's]",
        show_default=False)] = None
    sigma: Annotated[float | None, typer.Option(
        help="ES perturbation scale. [default: the task's]", show_default=False)] = None
    truncation_length: Annotated[int | None, typer.Option(
        "--truncation-length", "-K", help="Window length K. [default: the task's]",
        show_default=False)] = None
    backprop_depth: Annotated[int | None, typer.Option(
        "--backprop-depth", help="tbptt only: backpropagate each window's losses through "
        "this many steps of history (>= K; TBPTT(K, depth)). [default: K]",
        show_default=False)] = None
    normalize_losses: Annotated[bool | None, typer.Option(
        "--normalize-losses/--no-normalize-losses", help="ES estimators: scale each estimate "
        "by 2 sigma / (std of the particles' window losses), as augmented random search does "
        "with rewards. [default: the task's]", show_default=False)] = None
    centered_ranks: Annotated[bool | None, typer.Option(
        "--centered-ranks/--no-centered-ranks", help="ES estimators: replace each particle's "
        "window loss by its centred rank among all 2N (augmented random search's fitness "
        "shaping; docs/ars.md). [default: off]", show_default=False)] = None
    top_b: Annotated[int | None, typer.Option(
        "--top-b", metavar="B", help="ES estimators: average over the B antithetic pairs with "
        "the best window returns only (ARS V2-t; 1 <= B <= N / 2). [default: all pairs]",
        show_default=False)] = None
    stagger: Annotated[bool | None, typer.Option(
        "--stagger/--no-stagger", help="Windowed estimators: burn each particle in to a random "
        "step of its first episode (--no-stagger: all start at t = 0). [default: the task's, "
        "else staggered]", show_default=False)] = None
    reset: Annotated[str | None, typer.Option(
        help=_RESET_HELP, show_default=False)] = None
    optimizer: Annotated[str | None, typer.Option(
        help="Outer optimizer: sgd or adam. [default: the task's]", show_default=False)] = None
    lr: Annotated[float | None, typer.Option(
        help="Outer learning rate. [default: the task's]", show_default=False)] = None
    b1: Annotated[float | None, typer.Option(
        help="Adam's b1. [default: the task's]", show_default=False)] = None
    eval_every: Annotated[int | None, typer.Option(
        help="Evaluate every this many outer steps. [default: num_steps // 100]",
        show_default=False)] = None
    theta0: Annotated[str | None, typer.Option(
        help="Initial theta: one number per component, comma-separated (e.g. --theta0=-1,2). "
        "[default: the task's]", show_default=False)] = None
    nonfinite: Annotated[str | None, typer.Option(
        help="On a NaN/inf loss: raise (checkpoint the last good state and stop) or drop "
        "(leave those particles out and count them). [default: raise]",
        show_default=False)] = None
    checkpoint_every: Annotated[int | None, typer.Option(
        help="Checkpoint the run state every this many outer steps (also after the last, and "
        "on SIGINT/SIGTERM). [default: every 5 minutes]", show_default=False)] = None
    steps_per_call: Annotated[int | None, typer.Option(
        help="Run up to this many outer steps per compiled call, reading their metrics back "
        "once (calls still end at evaluations and --checkpoint-every multiples; a signal "
        "stops at the end of a call). [default: auto, calls of about 0.1 s]",
        show_default=False)] = None
    keep_checkpoints: Annotated[int | None, typer.Option(
        help="Keep this many of the newest intact checkpoints (each proven by its checksums); "
        "older ones are deleted. [default: 2]", show_default=False)] = None
    compile_cache: Annotated[bool, typer.Option(
        "--compile-cache/--no-compile-cache", help="Keep compiled XLA programs in "
        "~/.cache/pes/jax ($PES_COMPILE_CACHE_DIR; $PES_NO_COMPILE_CACHE=1 turns it off) so that "
        "the next identical run starts without compiling.")] = True
    config: Annotated[str | None, typer.Option(
        "--config", help="YAML or JSON file of settings (the names above with underscores, "
        "e.g. num_particles: 10); flags override it.", show_default=False)] = None
    resume: Annotated[str | None, typer.Option(
        "--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its latest "
        "checkpoint, with its config.json (only --num-steps, --checkpoint-every, "
        "--nonfinite, --devices, --steps-per-call and --keep-checkpoints may change); a damaged "
        "newest checkpoint is skipped for the newest intact one.",
        show_default=False)] = None
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the run already in --out.")] = False
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True
    log: Annotated[str | None, typer.Option("--log", **_LOG)] = None
    data_dir: Annotated[str | None, typer.Option("--data-dir", **_DATA_DIR)] = None
    dataset: Annotated[str | None, typer.Option("--dataset", **_DATASET)] = None
    size: Annotated[str | None, typer.Option("--size", **_SIZE)] = None
    objective: Annotated[str | None, typer.Option("--objective", **_OBJECTIVE)] = None
    backend: Annotated[str | None, typer.Option(
        help="swimmer and gym:ENV_ID (the MuJoCo suite): the simulator, mujoco (C, through a "
        "host callback) or mjx (pure JAX through mujoco.mjx, for GPUs/TPUs; pip install "
        "'pes[mjx]'). [default: mujoco]",
        show_default=False)] = None
    policy: Annotated[str | None, typer.Option(
        help="gym:ENV_ID: the policy, linear (a = clip(W obs + b)) or mlp (32, 32 tanh). "
        "[default: linear]", show_default=False)] = None
    survival_bonus_shift: Annotated[bool | None, typer.Option(
        "--survival-bonus-shift/--no-survival-bonus-shift", help="gym:ENV_ID (Hopper, "
        "Walker2d, Ant): train on the reward less the survival bonus per step; evaluations "
        "report the true return. [default: off]", show_default=False)] = None
    obs_norm: Annotated[bool | None, typer.Option(
        "--obs-norm/--no-obs-norm", help="gym:ENV_ID (the MuJoCo suite), ES estimators: "
        "augmented random search's observation normalisation, by running statistics of every "
        "observation visited, updated after each outer step and saved in policy.npz "
        "(docs/ars.md). [default: off]", show_default=False)] = None
    env_steps: Annotated[int | None, typer.Option(
        "--env-steps", help="gym:ENV_ID: a budget in environment steps instead of "
        "--num-steps.", show_default=False)] = None
    devices: Annotated[int | None, typer.Option(
        help="Split the particles over this many devices (on CPU: start with XLA_FLAGS="
        "--xla_force_host_platform_device_count=N). [default: 1; --distributed: all devices "
        "of all processes]", show_default=False)] = None
    distributed: Annotated[bool, typer.Option(
        "--distributed", help="One of several processes (e.g. one per host) sharing the "
        "particles: jax.distributed with the three flags below, or $PES_COORDINATOR_ADDRESS, "
        "$PES_NUM_PROCESSES, $PES_PROCESS_ID, or what JAX detects (SLURM, Open MPI). Process 0 "
        "writes the files; --out must be on a filesystem every process sees.")] = False
    coordinator_address: Annotated[str | None, typer.Option(
        metavar="HOST:PORT", help="--distributed: process 0's address and a free port.",
        show_default=False)] = None
    num_processes: Annotated[int | None, typer.Option(
        help="--distributed: how many processes.", show_default=False)] = None
    process_id: Annotated[int | None, typer.Option(
        help="--distributed: this process's index, 0 to num_processes - 1.",
        show_default=False)] = None

    def settings(self) -> dict[str, object]:
        """The RunConfig settings among the flags (None where not given), theta0 parsed."""
        return {name: parse_theta0(self.theta0) if name == "theta0" else getattr(self, name)
                for name in _RUN_SETTINGS}


# RunFlags that are RunConfig settings, in the order a resumed run compares them.
_RUN_SETTINGS = (
    "task", "estimator", "seed", "num_steps", "num_particles", "sigma", "truncation_length",
    "backprop_depth", "normalize_losses", "stagger", "reset", "centered_ranks", "top_b",
    "optimizer", "lr", "b1", "eval_every", "nonfinite", "out", "theta0", "checkpoint_every",
    "data_dir", "dataset", "size", "objective", "backend", "policy", "survival_bonus_shift",
    "obs_norm", "env_steps", "devices", "steps_per_call", "keep_checkpoints")


@dataclass_command(app, "run", RunFlags)
def run_command(flags: RunFlags, order: list[str]) -> None:
    """Train theta on TASK with one estimator; writes a run directory and prints a summary.

    Exit status: 0 done; 1 stopped by a non-finite loss (checkpointed: --resume continues);
    2 a bad setting; 130/143 stopped by SIGINT/SIGTERM (checkpointed: --resume continues).
    """
    with _user_errors():
        if not flags.compile_cache:
            disable_compile_cache()
        settings = _check_in_command_line_order(flags, order)
        _start_processes(flags.distributed, flags.coordinator_address, flags.num_processes,
                         flags.process_id)
        try:
            result = (_resume(flags, settings) if flags.resume is not None
                      else _execute(flags, settings))
        except RunFailed as e:
            if e.result is not None and _primary():
                typer.echo(e.result.summary_line())
            _fail(str(e), code=1)
        except RunInterrupted as e:
            if e.result is not None and _primary():
                typer.echo(e.result.summary_line())
            _fail(str(e), code=e.exit_code)
    if _primary():
        typer.echo(result.summary_line())


def _check_in_command_line_order(flags: RunFlags, order: list[str]) -> dict[str, object]:
    """``flags.settings()``, each given setting checked on its own in the order the command
    line gave them, so that the first error reported is the first thing wrong on it (``pes run
    no-such-task`` names the task, not the missing --estimator); only then are they checked
    against each other. ``order``: the parameter names as click filled them (command-line
    order first)."""
    from pes.runs.config import check_field, load_config_file

    settings: dict[str, object] = {name: getattr(flags, name) for name in _RUN_SETTINGS}
    settings["theta0"] = None
    for name in [*order, *(n for n in _RUN_SETTINGS if n not in order)]:
        if name == "theta0" and flags.theta0 is not None:
            settings["theta0"] = check_field("theta0", parse_theta0(flags.theta0))
        elif name == "config" and flags.config is not None and flags.resume is None:
            load_config_file(flags.config)  # a missing or unreadable file, named
        elif name == "resume" and flags.resume is not None:
            path = pathlib.Path(flags.resume)
            if not path.is_dir():
                what = ("the directory does not exist" if not path.exists()
                        else "not a directory")
                raise ConfigError(f"--resume {flags.resume}: {what}", field="resume")
        elif name in settings and settings[name] is not None:
            settings[name] = check_field(name, settings[name])
    return settings


def _resume(flags: RunFlags, settings: dict[str, object]):
    """pes run --resume RUN_DIR: the run continued from its latest checkpoint."""
    for name, given in (("--config", flags.config is not None),
                        ("--overwrite", flags.overwrite)):
        if given:
            _fail(f"{name} cannot be combined with --resume: a resumed run keeps "
                  "its directory and its config.json")
    return resume_run(flags.resume, settings, progress=flags.progress, log=flags.log)


def _execute(flags: RunFlags, settings: dict[str, object]):
    """pes run TASK -e NAME | --config FILE: a new run."""
    if flags.config is not None:
        run_config = RunConfig.from_file(flags.config, settings)
    else:
        if flags.task is None:
            _fail("missing TASK: pes run TASK --estimator NAME (or --config FILE, "
                  f"or --resume RUN_DIR); tasks: {_names(TASK_NAMES)}")
        if flags.estimator is None:
            _fail("missing --estimator NAME; estimators: "
                  f"{_names(ESTIMATOR_NAMES)}")
        run_config = RunConfig.from_dict(
            {k: v for k, v in settings.items() if v is not None}, source="flags")
    return execute_run(run_config, overwrite=flags.overwrite, progress=flags.progress,
                       log=flags.log)


def _start_processes(distributed: bool, coordinator_address: str | None,
                     num_processes: int | None, process_id: int | None) -> None:
    """--distributed: join the other processes before JAX computes anything."""
    given = [f"--{n.replace('_', '-')}" for n, v in (
        ("coordinator_address", coordinator_address), ("num_processes", num_processes),
        ("process_id", process_id)) if v is not None]
    if not distributed:
        if given:
            _fail(f"{given[0]} applies only with --distributed")
        return
    from pes.runs.distributed import initialize

    initialize(coordinator_address, num_processes, process_id)


def _primary() -> bool:
    from pes.runs.distributed import is_primary

    return is_primary()


def parse_theta0(text: str | None) -> float | list[float] | None:
    """``--theta0`` text: one number, or comma-separated numbers (a list)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"theta0={text!r} must be a number or comma-separated numbers, "
                          "e.g. --theta0=-1,2", field="theta0") from None
    return values if len(values) > 1 or "," in text else values[0]


@app.command("compare")
def compare_command(
    experiment: Annotated[str, typer.Argument(help=f"Experiment: {_names(EXPERIMENT_NAMES)}; or "
                                              "FILE.py:FUNCTION / package.module:FUNCTION, "
                                              "your System (PES, TES, NRES, full ES).",
                                              show_default=False)],
    seeds: Annotated[str | None, typer.Option(
        help="Comma-separated seeds, or a range like 0-4. [default: 0,1,2; mnist-lr-schedule: "
        "0]", show_default=False)] = None,
    out: Annotated[str | None, typer.Option(
        help="Output directory. [default: runs/compare/EXPERIMENT]", show_default=False)] = None,
    num_steps: Annotated[int | None, typer.Option(
        help="Outer steps for every estimator (quick runs). [default: the paper's]",
        show_default=False)] = None,
    estimators: Annotated[str | None, typer.Option(
        help="Comma-separated subset of the experiment's estimators (labels or names). "
        "[default: all]", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the comparison already in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    log: Annotated[str | None, typer.Option("--log", **_LOG)] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", **_DATA_DIR)] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", **_DATASET)] = None,
    size: Annotated[str | None, typer.Option("--size", **_SIZE)] = None,
    objective: Annotated[str | None, typer.Option("--objective", **_OBJECTIVE)] = None,
    heatmap_points: Annotated[int | None, typer.Option(
        help="mnist-lr-schedule: heatmap grid points per axis. [default: the size's]",
        show_default=False)] = None,
    reset: Annotated[str | None, typer.Option(help=_RESET_HELP, show_default=False)] = None,
    centered_ranks: Annotated[bool | None, typer.Option(
        "--centered-ranks/--no-centered-ranks", help="Comparisons of training runs (gym:ENV_ID): "
        "the ES arms use centred-rank fitness shaping (docs/ars.md). [default: off]",
        show_default=False)] = None,
    top_b: Annotated[int | None, typer.Option(
        "--top-b", metavar="B", help="Comparisons of training runs: the ES arms average over "
        "the B best antithetic pairs (ARS V2-t). [default: all pairs]",
        show_default=False)] = None,
    survival_bonus_shift: Annotated[bool | None, typer.Option(
        "--survival-bonus-shift/--no-survival-bonus-shift", help="gym:ENV_ID (Hopper, "
        "Walker2d, Ant): every arm trains on the reward less the survival bonus. [default: "
        "off]", show_default=False)] = None,
    obs_norm: Annotated[bool | None, typer.Option(
        "--obs-norm/--no-obs-norm", help="gym:ENV_ID (the MuJoCo suite): every arm normalises "
        "observations by running statistics (ARS V2; docs/ars.md). [default: off]",
        show_default=False)] = None,
) -> None:
    """Run the paper's comparison EXPERIMENT: every estimator it ran, over several seeds.

    mnist-lr-schedule and many-hyperparameters take --dataset, --data-dir, --size (and
    --objective, --heatmap-points for mnist-lr-schedule); their default seeds are 0 and 0,1,2
    (what fits 30 minutes on 2 cores at --size cpu).
    """
    options = CompareOptions(
        seeds=seeds, out=out, num_steps=num_steps, estimators=_csv(estimators),
        overwrite=overwrite, progress=progress, data_dir=data_dir, dataset=dataset, size=size,
        objective=objective, heatmap_points=heatmap_points, reset=reset,
        centered_ranks=centered_ranks, top_b=top_b, survival_bonus_shift=survival_bonus_shift,
        obs_norm=obs_norm)
    with _tracking(log), _user_errors():
        try:
            result = run_experiment(experiment, options, echo=typer.echo)
        except RunInterrupted as e:
            _fail(str(e), code=e.exit_code)
    for line in result.lines:
        typer.echo(line)
    typer.echo(result.summary_line())


@app.command("surface")
def surface_command(
    task: Annotated[str, typer.Argument(help=f"Task with a 2-D surface: "
                                        f"{_names(surface_tasks())}.", show_default=False)],
    more_runs: Annotated[list[str] | None, typer.Argument(
        metavar="[RUN_DIR]...", help="More run directories (as after --runs).",
        show_default=False)] = None,
    resolution: Annotated[int, typer.Option(help="Grid points per axis.")] = 101,
    runs: Annotated[list[str] | None, typer.Option(
        "--runs", help="Run directory (or a folder of them, e.g. a comparison) whose theta "
        "trajectory is drawn; repeatable.", show_default=False)] = None,
    out: Annotated[str | None, typer.Option(
        help="PNG file. [default: runs/TASK-surface.png]", show_default=False)] = None,
) -> None:
    """Draw the meta-loss heatmap over [-5, 5]^2 with the runs' trajectories over it."""
    with _user_errors():
        result = draw_surface(task, resolution=resolution,
                              runs=list(runs or []) + list(more_runs or []), out=out)
    typer.echo(f"{task}: {resolution}x{resolution} surface, minimum {result.minimum:.4g} at "
               f"theta=({result.argmin[0]:.3g}, {result.argmin[1]:.3g}); "
               f"{len(result.trajectories)} trajectories; wrote {result.path}")


data_app = typer.Typer(help="Datasets of the image tasks: download them into the cache.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("download")
def data_download_command(
    name: Annotated[str, typer.Argument(help="Dataset: mnist or fashion-mnist.",
                                        show_default=False)],
    cache_dir: Annotated[str | None, typer.Option(
        "--cache-dir", metavar="DIR", help="Folder to fetch into. [default: the cache the "
        "image tasks search: $PES_CACHE_DIR/NAME, $XDG_CACHE_HOME/pes/NAME or "
        "~/.cache/pes/NAME]", show_default=False)] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", metavar="URL", help="Fetch URL/FILE.gz instead of the canonical "
        "mirrors.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even files already "
                                        "there and verified.")] = False,
) -> None:
    """Fetch the four IDX .gz files of a dataset, each checked against its SHA-256.

    Exit status: 0 done; 1 a download failed or a checksum did not match (nothing written
    for that file); 2 a bad argument.
    """
    from pes import data as pes_data

    if name not in pes_data.DATASET_NAMES:
        _fail(f"dataset={name!r} is not known; known datasets: "
              f"{_names(pes_data.DATASET_NAMES)}")
    try:
        target = pes_data.download(name, cache_dir, base_url, force=force,
                                   progress=typer.echo)
    except OSError as e:
        _fail(str(e), code=1)
    typer.echo(f"{name}: the four files are in {target}")


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


@app.command("diagnose")
def diagnose_command(
    task: Annotated[str, typer.Argument(help=f"Task: {_names(TASK_NAMES)}, or FILE.py:FUNCTION "
                                        "/ package.module:FUNCTION (your System).",
                                        show_default=False)],
    estimators: Annotated[str, typer.Option(
        "--estimators", "-e", help="Comma-separated estimators, e.g. pes,tes,nres.",
        show_default=False)],
    truncation_lengths: Annotated[str | None, typer.Option(
        "--truncation-lengths", "-k", help="Comma-separated K values, e.g. 1,10,100; each "
        "must divide the episode length. Not for full-es and full-bptt (one row each). "
        "[default: each estimator's K on the task]", show_default=False)] = None,
    replicates: Annotated[int, typer.Option(
        "--replicates", "-r", help="Independent estimates per row.")] = 32,
    num_particles: Annotated[int | None, typer.Option(
        help="Particles per estimate. [default: the task's]", show_default=False)] = None,
    sigma: Annotated[float | None, typer.Option(
        help="ES perturbation scale, also the reference's smoothing. [default: the task's]",
        show_default=False)] = None,
    reference: Annotated[str, typer.Option(
        help="Reference gradient: autodiff (backprop averaged over perturbations) or es "
        "(full-episode ES).")] = "autodiff",
    reference_samples: Annotated[int, typer.Option(
        help="Antithetic pairs averaged by the reference.")] = 128,
    episode_length: Annotated[int | None, typer.Option(
        help="Episode length T for a task that never resets (influence-balancing). "
        "[default: the smallest multiple of every K that is >= 100]",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of every key.")] = 0,
    out: Annotated[str | None, typer.Option(
        help="Output directory. [default: runs/diagnose/TASK]", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the diagnosis already in --out.")] = False,
) -> None:
    """Bias, normalised variance and cost of estimators on TASK at its initial theta.

    Each estimate is the mean of the T/K windows of one episode; the reference is the
    gradient of the Gaussian-smoothed episode loss at the estimator's sigma. Prints the table
    and writes diagnose.json, diagnose.md and diagnose.png.
    """
    from pes.paper.diagnose_sweep import DiagnoseConfig, format_table, run_diagnose

    with _user_errors():
        ks = _csv(truncation_lengths)
        try:
            k_values = None if ks is None else tuple(int(k) for k in ks)
        except ValueError:
            raise ConfigError(f"truncation_lengths={truncation_lengths!r} must be comma-"
                              "separated ints, e.g. 1,10,100",
                              field="truncation_lengths") from None
        config = DiagnoseConfig(
            task=task, estimators=tuple(_csv(estimators) or ()), truncation_lengths=k_values,
            num_replicates=replicates, num_particles=num_particles, sigma=sigma,
            reference=reference, reference_samples=reference_samples,
            episode_length=episode_length, seed=seed, out=out, overwrite=overwrite)
        try:
            result = run_diagnose(config, echo=typer.echo)
        except ConfigError:
            raise
        except ValueError as e:  # e.g. a zero reference gradient
            _fail(str(e), code=1)
    typer.echo("")
    typer.echo(format_table(result))
    typer.echo(f"{task}: {len(result.rows)} rows in {result.wall_time_s:.1f} s; wrote "
               + ", ".join(str(f) for f in result.files))


def main() -> None:
    """Entry point of the ``pes`` console script and ``python -m pes``."""
    app(prog_name="pes")


if __name__ == "__main__":
    main()
