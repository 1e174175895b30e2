"""Every setting a user can get wrong, on the command line, in a config file or in a run
directory to resume, is refused with one line that names it and what is allowed, and exit 2;
nothing is written. Plus the good paths of --config (YAML and JSON, flags override)."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pes.cli import app
from pes.runs import RunConfig, read_config

RUNNER = CliRunner()

CONFIG_FILES = {
    "unknown.yaml": "task: toy-regression\nestimator: pes\nsigmaa: 0.1\n",
    "type.yaml": "task: toy-regression\nestimator: pes\nnum_steps: ten\n",
    "string.yaml": "task: toy-regression\nestimator: pes\nsigma: '0.1'\n",
    "negative.yaml": "task: toy-regression\nestimator: pes\nnum_particles: -4\n",
    "syntax.yaml": "task: toy-regression\nestimator: [pes\n",
    "syntax.json": '{"task": "toy-regression", "estimator": "pes",}',
    "list.yaml": "- task\n- estimator\n",
    "empty.yaml": "",
    "no-estimator.yaml": "task: toy-regression\n",
    "theta-length.yaml": "task: toy-regression\nestimator: pes\ntheta0: [1, 2, 3]\n",
    "theta-type.yaml": "task: toy-regression\nestimator: pes\ntheta0: {a: 1}\n",
    "horizon.yaml": "task: toy-regression\nestimator: tbptt\ntruncation_length: 500\n",
    "policy.json": '{"task": "toy-regression", "estimator": "pes", "nonfinite": "ignore"}',
    "checkpoint.yaml": "task: lorenz\nestimator: pes\ncheckpoint_every: 0\n",
}

# (arguments after `pes run`, the message it must give). {cfg}: the folder of CONFIG_FILES;
# {tmp}: an empty folder; {run}: a finished run with checkpoints (a fresh copy per case).
BAD_INPUTS = [
    # flags: ranges, types, names
    (["toy-regression", "-e", "pes", "--num-steps", "0"], "num_steps=0 must be an integer >= 1"),
    (["toy-regression", "-e", "pes", "--sigma", "-1"],
     "sigma=-1.0 must be a finite number > 0.0"),
    (["toy-regression", "-e", "pes", "--seed", "-1"],
     "seed=-1 must be an integer in [0, 2147483647]"),
    (["toy-regression", "-e", "pes", "--b1", "1.5"],
     "b1=1.5 must be a finite number >= 0.0 and < 1.0"),
    (["toy-regression", "-e", "pes", "--checkpoint-every", "0"],
     "checkpoint_every=0 must be an integer >= 1"),
    (["toy-regression", "-e", "pes", "--nonfinite", "ignore"],
     "nonfinite='ignore' is not a known non-finite policy; valid non-finite policies: raise, "
     "drop"),
    (["toy-regression", "-e", "pes", "--seed", "abc"], "Invalid value for '--seed'"),
    (["-e", "pes"], "missing TASK: pes run TASK --estimator NAME (or --config FILE, or "
     "--resume RUN_DIR); tasks: influence-balancing, toy-regression, lorenz"),
    (["toy-regression"], "missing --estimator NAME; estimators: pes, tes"),
    # theta shapes
    (["toy-regression", "-e", "pes", "--theta0", "1,2,3"],
     "theta0=[1.0, 2.0, 3.0] has 3 values, but task='toy-regression' takes 2 numbers "
     "(theta0 = log initial lr, theta1 = log final lr)"),
    (["influence-balancing", "-e", "pes", "--theta0", "1,2"],
     "theta0=[1.0, 2.0] has 2 values, but task='influence-balancing' takes a single number"),
    (["toy-regression", "-e", "pes", "--theta0", "abc"],
     "theta0='abc' must be a number or comma-separated numbers, e.g. --theta0=-1,2"),
    (["toy-regression", "-e", "pes", "--theta0=nan,1"], "theta0=[nan, 1.0] must hold finite "
     "numbers"),
    # horizons
    (["toy-regression", "-e", "tes", "-K", "101"],
     "truncation_length=101 is longer than the horizon of task='toy-regression' (100)"),
    (["influence-balancing", "-e", "full-bptt"],
     "estimator='full-bptt' needs episodes that end (it unrolls whole episodes), but "
     "task='influence-balancing' never resets"),
    # image-task options (checked before any data is read) and a dataset that is not there
    (["toy-regression", "-e", "pes", "--dataset", "mnist"],
     "dataset='mnist' does not apply to task='toy-regression'; only mnist-lr-schedule, "
     "many-hyperparameters, learned-optimizer take it"),
    (["many-hyperparameters", "-e", "pes", "--objective", "accuracy"],
     "objective='accuracy' does not apply to task='many-hyperparameters'; only "
     "mnist-lr-schedule takes it"),
    (["mnist-lr-schedule", "-e", "pes", "--dataset", "kmnist"],
     "dataset='kmnist' is not a known dataset; valid datasets: fashion-mnist, mnist"),
    (["mnist-lr-schedule", "-e", "pes", "--size", "huge"],
     "size='huge' is not a known size; valid sizes: cpu, paper, tiny"),
    (["mnist-lr-schedule", "-e", "pes", "--objective", "valid"],
     "objective='valid' is not a known objective; valid objectives: loss, accuracy"),
    (["mnist-lr-schedule", "-e", "rtrl", "--size", "tiny"],
     "task='mnist-lr-schedule' has no settings for estimator='rtrl'"),
    (["mnist-lr-schedule", "-e", "pes", "--dataset", "mnist", "--data-dir", "{tmp}"],
     "dataset 'mnist' not found in --data-dir {tmp} (an explicit location is the only one "
     "searched). Searched: {tmp}/mnist (no such folder); {tmp} (none of the 4 files)."),
    (["mnist-lr-schedule", "-e", "pes", "--dataset", "mnist", "--data-dir", "{tmp}"],
     "To get it: run `pes data download mnist`"),
    # paths
    (["toy-regression", "-e", "pes", "--out", "{cfg}/type.yaml"],
     "type.yaml' exists and is not a directory"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
    (["--config", "{cfg}"], "is not a file"),
    # config files
    (["--config", "{cfg}/unknown.yaml"],
     "unknown.yaml has unknown setting 'sigmaa'; valid settings: task, estimator, seed"),
    (["--config", "{cfg}/type.yaml"], "type.yaml: num_steps='ten' must be an integer >= 1"),
    (["--config", "{cfg}/string.yaml"], "string.yaml: sigma='0.1' must be a number"),
    (["--config", "{cfg}/negative.yaml"],
     "negative.yaml: num_particles=-4 must be an integer >= 1"),
    (["--config", "{cfg}/syntax.yaml"],
     "syntax.yaml is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3"),
    (["--config", "{cfg}/syntax.json"],
     "syntax.json is not valid JSON: Expecting property name enclosed in double quotes at "
     "line 1, column 47"),
    (["--config", "{cfg}/list.yaml"],
     "list.yaml must hold a mapping of settings (name: value), not a list"),
    (["--config", "{cfg}/empty.yaml"], "empty.yaml is empty: it must hold settings"),
    (["--config", "{cfg}/no-estimator.yaml"],
     "no-estimator.yaml lacks the required setting 'estimator'"),
    (["--config", "{cfg}/theta-length.yaml"],
     "theta-length.yaml: theta0=[1.0, 2.0, 3.0] has 3 values, but task='toy-regression' "
     "takes 2 numbers"),
    (["--config", "{cfg}/theta-type.yaml"],
     "theta-type.yaml: theta0={{'a': 1}} must be a number or a list of numbers"),
    (["--config", "{cfg}/horizon.yaml"],
     "horizon.yaml: truncation_length=500 is longer than the horizon"),
    (["--config", "{cfg}/policy.json"],
     "policy.json: nonfinite='ignore' is not a known non-finite policy"),
    (["--config", "{cfg}/checkpoint.yaml"],
     "checkpoint.yaml: checkpoint_every=0 must be an integer >= 1"),
    (["--config", "{cfg}/horizon.yaml", "--num-particles", "0"],  # a flag's error: no file
     "Error: num_particles=0 must be an integer >= 1"),
    # resume
    (["--resume", "{tmp}/nope"], "the directory does not exist"),
    (["--resume", "{cfg}"], "not a pes run directory (it has no config.json)"),
    (["--resume", "{cfg}/type.yaml"], "type.yaml: not a directory"),
    (["--resume", "{run}", "--lr", "0.5"],
     "lr=0.5 contradicts {run}/config.json (lr=0.0001): a resumed run keeps its "
     "configuration; only num_steps, checkpoint_every, nonfinite, devices, steps_per_call, "
     "keep_checkpoints may change"),
    (["--resume", "{run}", "-e", "pes"], "estimator='pes' contradicts"),
    (["--resume", "{run}", "--theta0", "2"], "theta0=2.0 contradicts"),
    (["--resume", "{run}", "--num-steps", "2"],
     "num_steps=2 is less than the 5 outer steps the checkpoint in {run}/checkpoints has "
     "already taken"),
    (["--resume", "{run}", "--out", "{tmp}/elsewhere"],
     "contradicts --resume {run}: a resumed run stays in its directory"),
    (["--resume", "{run}", "--config", "{cfg}/type.yaml"],
     "--config cannot be combined with --resume"),
    (["--resume", "{run}", "--overwrite"], "--overwrite cannot be combined with --resume"),
]


def _no_checkpoints(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")


def _only_a_partial_write(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / "4.orbax-checkpoint-tmp" / "state").mkdir(parents=True)


def _edit_config(**changes):
    def edit(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _cut_metrics(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")


# (what is done to a finished run directory, the message `pes run --resume` must give)
BROKEN_RUNS = [
    (_no_checkpoints, "the run has no checkpoint ({run}/checkpoints does not exist); start "
     "it again with --overwrite"),
    (_only_a_partial_write, "the run has no complete checkpoint in {run}/checkpoints"),
    (lambda run: (run / "config.json").write_text("{"), "config.json is not valid JSON"),
    (_edit_config(num_particles=3),
     "holds ['estimator_state'].inner as float32[1, 1, 23], but this run's state has "
     "float32[3, 1, 23]: it was written with other settings"),
    # tbptt's config.json carries backprop_depth, which uoro does not take.
    (_edit_config(estimator="uoro", backprop_depth=None),
     "has no array at ['estimator_state'].noise.s_tilde"),
    (_edit_config(seed=4), "the checkpoint of step 5 was written with seed 0, but "
     "config.json says seed=4"),
    (_edit_config(sigma=0.1), "sigma=0.1 contradicts estimator='tbptt'"),
    (_cut_metrics, "metrics.jsonl does not hold what it held when the checkpoint of step 5 "
     "was written (6 lines, "),
]


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli("run", "influence-balancing", "-e", "tbptt", "--num-steps", 5,
                 "--checkpoint-every", 2, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def places(tmp_path, finished_run) -> dict[str, str]:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    for name, text in CONFIG_FILES.items():
        (cfg / name).write_text(text)
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return {"cfg": str(cfg), "tmp": str(tmp_path / "tmp"), "run": str(run)}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_refused(result, message: str) -> None:
    text = result.output
    assert result.exit_code == 2, text
    assert message in text, text
    assert "Traceback" not in text
    assert len([line for line in text.splitlines() if line.startswith("Error")]) == 1, text


def test_the_table_is_large_enough():
    assert len(BAD_INPUTS) + len(BROKEN_RUNS) >= 20


@pytest.mark.parametrize("args, message", BAD_INPUTS,
                         ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(places, args, message):
    args = [a.format(**places) for a in args]
    if "--resume" not in args and "--out" not in args:
        args += ["--out", f"{places['tmp']}/x"]
    run = Path(places["run"])
    before = _files(run)
    result = cli("run", *args, "--no-progress")
    assert_refused(result, message.format(**places))
    assert not (Path(places["tmp"]) / "x").exists()
    assert _files(run) == before  # a refused resume touches nothing


@pytest.mark.parametrize("damage, message", BROKEN_RUNS)
def test_resume_of_a_broken_run_is_refused(places, damage, message):
    run = Path(places["run"])
    damage(run)
    before = _files(run)
    result = cli("run", "--resume", run, "--no-progress")
    assert_refused(result, message.format(**places))
    assert _files(run) == before


def test_config_file_with_flags_overriding_it(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("# a run\ntask: toy-regression\nestimator: pes\nnum_particles: 4\n"
                         "sigma: 1e-1\ntheta0: [-1, 2.5]\nnum_steps: 50\n")
    out = tmp_path / "out"
    result = cli("run", "--config", yaml_file, "--num-steps", 2, "--seed", 3, "--out", out,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert (config.sigma, config.theta0, config.num_steps, config.seed) == (
        0.1, (-1.0, 2.5), 2, 3)
    assert config.num_particles == 4 and config.checkpoint_every is None  # by time

    # config.json itself is a valid config file, and gives the same configuration.
    again = RunConfig.from_file(out / "config.json")
    assert again == config
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"task": "influence-balancing", "estimator": "tbptt",
                                     "theta0": 0.25, "num_steps": 1}))
    assert RunConfig.from_file(json_file).theta0 == 0.25


def test_a_tasks_static_estimators_cover_what_its_defaults_offer(tmp_path):
    """TaskEntry.estimators (checked before a dataset is looked for) must hold every estimator
    the built task's defaults() offer, for each of its options."""
    from test_data import make_dataset_dir

    from pes.runs.config import make_task
    from pes.runs.registry import TASKS

    make_dataset_dir(tmp_path / "fashion-mnist", num_train=10040, num_test=20, gz=False)
    checked = 0
    for name, entry in TASKS.items():
        if entry.estimators is None:
            continue
        variants = ([{"objective": o} for o in ("loss", "accuracy")]
                    if "objective" in entry.options else [{}])
        for extra in variants:
            task = make_task(name, {**entry.options, "data_dir": str(tmp_path), "size": "tiny",
                                    **extra})
            assert set(task.defaults().estimators) <= set(entry.estimators), (name, extra)
            checked += 1
    assert checked == 4
