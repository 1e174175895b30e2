"""The paper's comparisons as data: which estimators, with which settings, on which plot.

Each :class:`Experiment` is a task and a list of :class:`Arm` (one line on the plot: an
estimator and the settings that differ from the task's defaults). Everything else (N, sigma,
K, optimizer, outer steps) comes from the task's ``defaults()``, which follow the paper.
Each also names its runner (``"module:function"``, imported when it runs): most compare
training runs (:func:`pes.paper.compare.compare_training_runs`); the image, learned-optimizer
and variance comparisons have their own protocol. Every runner returns a
:class:`pes.paper.compare.ComparisonResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from pes.runs.registry import get_task, unknown_name

# Runners, as "module:function" called as function(name, CompareOptions, echo) ->
# ComparisonResult (see pes.paper.compare.run_experiment).
TRAINING_RUNS = "pes.paper.compare:compare_training_runs"
IMAGES = "pes.paper.images:compare_images"
LEARNED_OPTIMIZER = "pes.paper.learned_optimizer_comparison:compare_learned_optimizer"
VARIANCE = "pes.paper.variance_comparison:compare_variance"


def load(reference: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names (importing its module)."""
    module, function = reference.split(":")
    return getattr(import_module(module), function)


@dataclass(frozen=True)
class Arm:
    """One estimator in a comparison: ``label`` (unique in the experiment), the estimator's
    name, and RunConfig overrides (e.g. ``{"truncation_length": 10}``)."""

    label: str
    estimator: str
    overrides: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Experiment:
    """A comparison from the paper.

    metric: the ``task.evaluate`` key on the y axis (default: the task's plot metric);
    log_y: log-scale y axis as in the paper; plot_theta: also plot theta against inner steps;
    expected: what the paper found, quoted in results.md.
    log_x: the inner-steps panel on a log axis (False: linear, as the paper's env-step plots).
    milestones, budget, level_arm: for a metric that grows (a return), results.md adds a table
      per run: the metric at the last evaluation within ``budget`` inner steps, and the inner
      steps at which it first reached each milestone and 95% of ``level_arm``'s mean final
      value.
    runner: who runs it (see the module docstring); views: for a comparison of training runs,
      ``"module:function"`` drawing more pictures after the runs, called as
      ``function(out_dir, arm_results, echo) -> [Path]`` (the swimmer's paths and animation).
    """

    name: str
    task: str
    title: str
    description: str
    arms: tuple[Arm, ...]
    log_y: bool
    plot_theta: bool
    expected: str
    metric: str | None = None
    log_x: bool = True
    milestones: tuple[float, ...] = ()
    budget: int | None = None
    level_arm: str | None = None
    runner: str = TRAINING_RUNS
    views: str | None = None
    # The arms run when no --estimators are given (None: all); the output folder under
    # runs/compare/ (None: the name).
    default_arms: tuple[str, ...] | None = None
    folder: str | None = None

    @property
    def metric_key(self) -> str:
        return self.metric or get_task(self.task).metric

    @property
    def metric_label(self) -> str:
        entry = get_task(self.task)
        return entry.metric_label if self.metric_key == entry.metric else self.metric_key

    def arm_labels(self) -> tuple[str, ...]:
        return tuple(a.label for a in self.arms)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            name="influence-balancing",
            task="influence-balancing",
            title="Influence balancing (PES paper, experiment 1)",
            description="fully online, one inner step and one update per outer step for "
            "every estimator: PES and truncated ES with K = 1, TBPTT(1, k2) backpropagating "
            "each step's loss through the last k2 = 1, 10 and 100 steps, RTRL and UORO, on the "
            "linear system whose short-horizon gradient has the wrong sign (N = 1000, "
            "sigma = 0.1, SGD lr 1e-4, 3000 outer steps)",
            arms=(
                Arm("pes", "pes"),
                Arm("tes", "tes"),
                Arm("tbptt-depth1", "tbptt", {"truncation_length": 1, "backprop_depth": 1}),
                Arm("tbptt-depth10", "tbptt", {"truncation_length": 1, "backprop_depth": 10}),
                Arm("tbptt-depth100", "tbptt", {"truncation_length": 1, "backprop_depth": 100}),
                Arm("rtrl", "rtrl"),
                Arm("uoro", "uoro"),
            ),
            log_y=True,
            plot_theta=True,
            expected="PES and RTRL reach theta* = -1/6 (500-step loss ~0); TES and TBPTT with "
            "a 1-step history drive theta the wrong way (above 3 after 3000 steps), as does a "
            "10-step history (S_10 = +10); TBPTT with a 100-step history (S_100 = -6) gets "
            "close.",
        ),
        Experiment(
            name="toy-regression",
            task="toy-regression",
            title="Toy 2-D regression with a chaotic meta-loss (PES paper, experiment 2)",
            description="the linear learning-rate schedule of 100 SGD steps on a 2-D function, "
            "theta from (-4, -4): PES, truncated ES (sigma 1.0), TBPTT, RTRL and UORO with "
            "K = 10 (N = 100, sigma = 0.3, Adam lr 1e-2 b1 0.99)",
            arms=(
                Arm("pes", "pes"),
                Arm("tes", "tes"),
                Arm("tbptt", "tbptt"),
                Arm("rtrl", "rtrl"),
                Arm("uoro", "uoro"),
            ),
            log_y=False,
            plot_theta=True,
            expected="PES reaches the robust region theta0 ~ 2.75 (meta-objective ~553-570, "
            "~2488 at the start); TBPTT and RTRL stay near 2423; TES stalls in between.",
        ),
        Experiment(
            name="lorenz",
            task="lorenz",
            title="Lorenz system identification (NRES follow-up)",
            description="learn log a and log r of a Lorenz system from (3.116, 3.7) over "
            "T = 2000 Euler steps with the follow-up's settings per estimator (ES: 200 "
            "antithetic pairs, K = 100, sigma = 0.04, SGD)",
            arms=tuple(Arm(name, name) for name in
                       ("pes", "nres", "tes", "full-es", "tbptt", "rtrl", "uoro", "full-bptt")),
            log_y=True,
            plot_theta=True,
            expected="PES and NRES recover a = 10 and r = 28 (within 5%); the truncated and "
            "backprop methods suffer from the chaos of the long unroll.",
        ),
    )
}
# The image-data comparisons: run by pes.paper.images (heatmap, best-so-far against random
# search).
EXPERIMENTS["mnist-lr-schedule"] = Experiment(
    name="mnist-lr-schedule",
    task="mnist-lr-schedule",
    title="Learning-rate schedule of an MLP on (Fashion-)MNIST (PES paper, experiment 3)",
    description="PES and TES on theta = (log lr0, log decay) for the training-loss and the "
    "validation-accuracy objectives, drawn on a heatmap of full runs",
    arms=(Arm("pes", "pes"), Arm("tes", "tes")),
    log_y=False,
    plot_theta=True,
    expected="TES settles at a larger decay than PES (short-horizon bias); PES reaches the "
    "good region of the heatmap, for both objectives.",
    runner=IMAGES,
)
EXPERIMENTS["many-hyperparameters"] = Experiment(
    name="many-hyperparameters",
    task="many-hyperparameters",
    title="29 hyperparameters of an MLP on (Fashion-)MNIST (PES paper, experiment 4), "
    "against random search",
    description="PES, TES and random search (PES's inner steps) from random theta: "
    "best-so-far validation loss against inner steps",
    arms=(Arm("pes", "pes"), Arm("tes", "tes")),
    log_y=False,
    plot_theta=False,
    expected="PES's best-so-far is at or below random search's at equal inner steps.",
    runner=IMAGES,
)
# The learned optimizer (PES paper, experiment 5): run by
# pes.paper.learned_optimizer_comparison (meta-test losses, tuned SGD).
EXPERIMENTS["learned-optimizer"] = Experiment(
    name="learned-optimizer",
    task="learned-optimizer",
    title="Meta-training a learned optimizer on MLP classifiers (PES paper, experiment 5; "
    "--size cpu|paper|full|tiny)",
    description="PES, TES, full ES (at PES's inner steps) and NRES meta-train a per-parameter "
    "MLP optimizer; meta-test loss on held-out inner problems, against tuned SGD",
    arms=(Arm("pes", "pes"), Arm("tes", "tes"), Arm("full-es", "full-es"),
          Arm("nres", "nres")),
    log_y=False,
    plot_theta=False,
    expected="PES reaches a lower meta-test loss than TES in most seeds, with a smaller "
    "spread across seeds than full ES at equal inner steps, and beats tuned SGD.",
    runner=LEARNED_OPTIMIZER,
)
# The variance study (PES paper, experiment 7): not training runs; run by
# pes.paper.variance_comparison.
EXPERIMENTS["variance"] = Experiment(
    name="variance",
    task="text-lstm",
    title="Gradient variance against the number of unrolls T/K on a character LSTM (PES "
    "paper, variance study; --size default|paper|tiny)",
    description="normalised variance of full-episode PES, NRES and TES estimates made of T/K "
    "windows, on real text, random tokens and one repeated token",
    arms=(Arm("pes", "pes"), Arm("nres", "nres"), Arm("tes", "tes")),
    log_y=True,
    plot_theta=False,
    expected="PES's variance grows > 10x from 1 to 1000 unrolls on random tokens and stays "
    "within 2x on the repeated token; NRES stays within 2x; TES is biased where the sequence "
    "has memory.",
    runner=VARIANCE,
)
EXPERIMENTS["swimmer"] = Experiment(
    name="swimmer",
    task="swimmer",
    title="MuJoCo Swimmer with a linear policy (PES paper, experiment 6)",
    description="PES (K = 100, sigma 0.3, lr 0.1), full-episode ES (K = T = 1000, sigma 0.3, "
    "lr 0.3), truncated ES (K = 100, sigma 0.1, lr 0.1) and NRES (PES's settings), 10 "
    "antithetic pairs and plain SGD ascent each on the estimate divided by the spread of the "
    "particles' window returns (the paper's code's --divide_by_variance), every pair from "
    "t = 0, W from zeros: the unperturbed policy's return against total environment steps "
    "(all particles) up to about 5e5",
    # An evaluation runs 5 episodes of 1000 steps: every ~10k training steps resolves the
    # 150k mark while keeping evaluation a fraction of the run.
    arms=(Arm("pes", "pes", {"eval_every": 5}), Arm("full-es", "full-es", {"eval_every": 1}),
          Arm("tes", "tes", {"eval_every": 4}), Arm("nres", "nres", {"eval_every": 5})),
    log_y=False,
    plot_theta=False,
    expected="PES reaches a return of 300 within 150k environment steps in most seeds; TES "
    "stays below 60; full ES needs more environment steps than PES to reach PES's level.",
    log_x=False,
    milestones=(60.0, 300.0),
    budget=150_000,
    level_arm="pes",
    views="pes.paper.swimmer_view:comparison_views",
)


# ----------------------------------------------------------------------------- locomotion
# PES against augmented random search (Mania, Guy, Recht 2018) on gymnasium's MuJoCo v5 suite:
# the ARS arm is full-episode ES with ARS V2-t's augmentations (observation normalisation,
# top-b directions, the step divided by the spread of the kept returns, plain SGD, the survival
# bonus subtracted where there is one) and ARS's own settings for the environment (its Table 9
# as we read it: directions N, top b, step alpha, noise nu); PES, NRES and truncated ES take the
# same augmentations, N and nu with windows of K = 100 and a learning rate chosen on a
# tuning seed (100) that no reported run uses, but every pair (no top-b): a window's return
# ranks its pair's state in the episode as much as its direction, so keeping the b best
# windows mostly keeps the pairs in good states (on the tuning seed, HalfCheetah's PES plateaued
# near 1,000 with top-4 of 32 and kept rising without). ARS's thresholds are its Table 1's.


@dataclass(frozen=True)
class Locomotion:
    env_id: str
    threshold: float
    directions: int
    top_b: int
    alpha: float
    nu: float
    shift: bool
    window_lr: float
    env_steps: int


LOCOMOTION = {
    "hopper": Locomotion("Hopper-v5", 3120.0, 8, 4, 0.01, 0.025, True, 0.01, 2_000_000),
    "halfcheetah": Locomotion("HalfCheetah-v5", 3430.0, 32, 4, 0.02, 0.03, False, 0.01,
                              2_000_000),
    "walker2d": Locomotion("Walker2d-v5", 4390.0, 40, 30, 0.03, 0.025, True, 0.01, 2_000_000),
}


def locomotion_experiment(name: str, spec: Locomotion) -> Experiment:
    """``pes compare locomotion-NAME``: PES against ARS-style full ES (module comment)."""
    particles, k = 2 * spec.directions, 100
    common = {"num_particles": particles, "sigma": spec.nu,
              "normalize_losses": True, "optimizer": "sgd", "obs_norm": True,
              "survival_bonus_shift": spec.shift, "env_steps": spec.env_steps}
    # Evaluations every ~64k-100k training steps for every arm (full ES: one estimate is
    # 2N whole episodes; a window is 2N x K steps).
    window_every = max(1, round(100_000 / (particles * k)))
    window = {**common, "truncation_length": k, "lr": spec.window_lr,
              "eval_every": window_every}
    return Experiment(
        name=f"locomotion-{name}", task=f"gym:{spec.env_id}",
        title=f"{spec.env_id}: PES against augmented random search (linear policies)",
        description=f"ARS V2-t as full-episode ES ({spec.directions} directions, top "
        f"{spec.top_b}, step {spec.alpha}, noise {spec.nu}"
        f"{', survival bonus subtracted' if spec.shift else ''}, observations normalised) "
        f"against PES, NRES and truncated ES with the same augmentations over all "
        f"{spec.directions} pairs and K = 100 (SGD lr {spec.window_lr}), "
        f"{spec.env_steps:,} environment steps each",
        arms=(Arm("ars", "full-es", {**common, "top_b": spec.top_b, "lr": spec.alpha,
                                      "eval_every": 1}),
              Arm("pes", "pes", window), Arm("nres", "nres", window), Arm("tes", "tes", window)),
        log_y=False, plot_theta=False, log_x=False, metric="return",
        expected=f"ARS (Mania et al. 2018, Table 1) reaches {spec.threshold:g} on the v1 "
        "environment; the goal here is PES reaching it in fewer median environment steps than "
        "the ARS arm.",
        milestones=(spec.threshold,), budget=spec.env_steps, level_arm="ars",
        default_arms=("ars", "pes"))


for _name, _spec in LOCOMOTION.items():
    EXPERIMENTS[f"locomotion-{_name}"] = locomotion_experiment(_name, _spec)
EXPERIMENT_NAMES = tuple(EXPERIMENTS)
IMAGE_COMPARISONS = tuple(name for name, e in EXPERIMENTS.items() if e.runner == IMAGES)


def user_experiment(spec: str) -> Experiment:
    """``pes compare FILE.py:fn`` (or ``package.module:fn``): training runs of a user's System
    with every estimator it offers; the ES ones (PES, TES, and NRES and full ES when episodes
    end) unless --estimators names others."""
    from pes.runs.config import make_task
    from pes.runs.user_task import ES_ESTIMATORS, normalize_spec, slug

    task_name = normalize_spec(spec)
    offered = tuple(make_task(task_name).defaults().estimators)
    return Experiment(
        name=spec, task=task_name, title=f"Your System {slug(spec)}",
        description=f"training runs of the System from {spec}, each estimator with the "
        "factory's default settings",
        arms=tuple(Arm(n, n) for n in offered), log_y=False, plot_theta=True, expected="",
        default_arms=tuple(n for n in offered if n in ES_ESTIMATORS), folder=slug(spec))


def gym_experiment(name: str) -> Experiment:
    """``pes compare gym:ENV_ID``: training runs on a gymnasium environment (linear policy)
    with the task's ES estimators; PES and full ES unless --estimators names others. The
    metric is the mean episode return."""
    from pes.runs.config import make_task

    offered = tuple(make_task(name).defaults().estimators)
    folder = name.replace(":", "-")
    return Experiment(
        name=name, task=name, title=f"gymnasium {name[len('gym:'):]}",
        description=f"training runs of a linear policy on {name}, each estimator with the "
        "task's default settings", arms=tuple(Arm(n, n) for n in offered), log_y=False,
        plot_theta=False, expected="", log_x=False,
        default_arms=tuple(n for n in ("pes", "full-es") if n in offered), folder=folder)


def get_experiment(name: str, field_name: str = "experiment") -> Experiment:
    from pes.runs.gym_task import is_gym_task
    from pes.runs.user_task import is_user_spec

    if name not in EXPERIMENTS and is_gym_task(name):
        return gym_experiment(name)
    if name not in EXPERIMENTS and is_user_spec(name):
        return user_experiment(name)
    if name not in EXPERIMENTS:
        raise unknown_name(field_name, name, "experiment", EXPERIMENT_NAMES)
    return EXPERIMENTS[name]
