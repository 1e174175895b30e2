"""Fuzzed configuration (hypothesis): config files (YAML and JSON) and command lines generated
for every task and estimator. Every invalid one exits 2 with one line naming the bad field and
no traceback; every valid one at tiny size runs its one step. The CLI runs in-process.

Example counts are bounded (settings below); `pytest -s` prints how many ran.
"""

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pes.cli import app
from pes.runs.config import RunConfig
from pes.runs.registry import ESTIMATOR_NAMES, TASK_NAMES, get_estimator

pytestmark = pytest.mark.slow
RUNNER = CliRunner()
COUNTS = {"invalid-file": 0, "invalid-flags": 0, "valid": 0}
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

INT_FIELDS = {"seed": 0, "num_steps": 1, "num_particles": 1, "truncation_length": 1,
              "backprop_depth": 1, "eval_every": 1, "checkpoint_every": 1, "devices": 1,
              "steps_per_call": 1, "keep_checkpoints": 1, "env_steps": 1, "top_b": 1}
POSITIVE_FLOATS = ("sigma", "lr")
NAME_FIELDS = ("estimator", "optimizer", "nonfinite", "dataset", "size", "objective",
               "backend", "task", "policy", "reset")
SCALARS = st.one_of(st.text(min_size=1, max_size=8), st.booleans(),
                    st.lists(st.integers(), min_size=1, max_size=3))


def bad_value(name: str) -> st.SearchStrategy:
    """Values that field ``name`` refuses on its own, whatever the rest of the config says."""
    if name in INT_FIELDS:
        low = INT_FIELDS[name]
        return st.one_of(st.integers(max_value=low - 1), SCALARS,
                         st.floats(allow_nan=True).filter(lambda x: x != int(x)
                                                          if math.isfinite(x) else True))
    if name in POSITIVE_FLOATS:
        return st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
                         st.text(min_size=1, max_size=8), st.booleans())
    if name == "b1":
        return st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.just(math.nan))
    if name in NAME_FIELDS:
        # No ':' in a bad name: "module:function" is a user System's spec, which imports and
        # calls what it names.
        return st.one_of(st.text(max_size=12).filter(lambda s: s not in _valid_names(name)
                                                     and ":" not in s),
                         st.integers(), st.booleans())
    if name == "theta0":
        return st.one_of(st.just([]), st.text(min_size=1, max_size=5),
                         st.lists(st.just(math.nan), min_size=1, max_size=2))
    if name == "lr_schedule":
        return st.one_of(st.text(min_size=1, max_size=5), st.just([[1, -1.0]]),
                         st.just([[5, 0.1], [2, 0.1]]))
    if name == "data_dir":
        return st.one_of(st.just(""), st.integers(), st.booleans())
    raise AssertionError(name)


def _valid_names(name: str) -> tuple:
    from pes.runs import config

    return {"estimator": ESTIMATOR_NAMES, "task": TASK_NAMES, "optimizer": ("sgd", "adam"),
            "nonfinite": ("raise", "drop"), "dataset": config.DATASET_NAMES,
            "size": config.TASK_SIZES, "objective": config.OBJECTIVES,
            "backend": ("mujoco", "mjx"), "policy": ("linear", "mlp"),
            "reset": ("slot", "pair")}[name]


FIELDS = sorted(set(RunConfig.fields()) - {"out", "normalize_losses", "stagger",
                                            "centered_ranks", "survival_bonus_shift",
                                            "obs_norm"})


@st.composite
def invalid_config(draw):
    """(settings, the field that is wrong): a task and estimator, a few valid-looking settings,
    and one field with a value it refuses (or an unknown key)."""
    data = {"task": draw(st.sampled_from(TASK_NAMES)),
            "estimator": draw(st.sampled_from(ESTIMATOR_NAMES)), "num_steps": 1}
    if draw(st.booleans()):
        key = draw(st.from_regex(r"[a-z]{3,10}", fullmatch=True).filter(
            lambda k: k not in RunConfig.fields()))
        data[key] = draw(st.integers())
        return data, key
    name = draw(st.sampled_from(FIELDS))
    data[name] = draw(bad_value(name))
    return data, name


def one_error_line(result, field: str) -> str:
    assert result.exit_code == 2, (field, result.output)
    assert "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert field in lines[0], (field, lines[0])
    return lines[0]


@settings(max_examples=150, **SETTINGS)
@given(case=invalid_config(), fmt=st.sampled_from(["yaml", "json"]))
def test_invalid_config_files_are_one_line_naming_the_field(tmp_path_factory, case, fmt):
    data, field = case
    path = Path(tmp_path_factory.mktemp("cfg")) / f"run.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data))
    result = RUNNER.invoke(app, ["run", "--config", str(path), "--no-progress", "--out",
                                 str(path.parent / "out")])
    one_error_line(result, field)
    COUNTS["invalid-file"] += 1


FLAG_FIELDS = ("seed", "num_steps", "num_particles", "sigma", "truncation_length", "lr", "b1",
               "eval_every", "checkpoint_every", "steps_per_call", "keep_checkpoints",
               "optimizer", "nonfinite")


@settings(max_examples=100, **SETTINGS)
@given(task=st.sampled_from(TASK_NAMES), estimator=st.sampled_from(ESTIMATOR_NAMES),
       name=st.sampled_from(FLAG_FIELDS), data=st.data())
def test_invalid_flags_are_one_line_naming_the_field(task, estimator, name, data):
    if name in INT_FIELDS:
        value = data.draw(st.integers(max_value=INT_FIELDS[name] - 1))
    elif name in POSITIVE_FLOATS:
        value = data.draw(st.one_of(st.floats(max_value=0.0), st.just(math.nan),
                                    st.just(math.inf)))
    elif name == "b1":
        value = data.draw(st.one_of(st.floats(min_value=1.0), st.just(math.nan)))
    else:
        value = data.draw(st.text(alphabet="abcxyz-", min_size=1, max_size=8).filter(
            lambda s: s not in _valid_names(name)))
    flag = "--" + name.replace("_", "-")
    result = RUNNER.invoke(app, ["run", task, "-e", estimator, f"{flag}={value}",
                                 "--no-progress"])
    one_error_line(result, name)
    COUNTS["invalid-flags"] += 1


CHEAP_TASKS = {"toy-regression": ESTIMATOR_NAMES,
               "influence-balancing": ("pes", "rtrl", "tbptt", "tes", "uoro")}


@st.composite
def valid_config(draw):
    task = draw(st.sampled_from(sorted(CHEAP_TASKS)))
    estimator = draw(st.sampled_from(CHEAP_TASKS[task]))
    params = get_estimator(estimator).params
    data = {"task": task, "estimator": estimator, "num_steps": 1,
            "seed": draw(st.integers(0, 2**31 - 1))}
    if "num_particles" in params:
        data["num_particles"] = 2 * draw(st.integers(1, 3))
    if "sigma" in params and draw(st.booleans()):
        data["sigma"] = draw(st.floats(0.01, 1.0))
    if "truncation_length" in params and draw(st.booleans()):
        data["truncation_length"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        data["optimizer"] = draw(st.sampled_from(["sgd", "adam"]))
        data["lr"] = draw(st.floats(1e-4, 0.1))
    if draw(st.booleans()):
        data["nonfinite"] = draw(st.sampled_from(["raise", "drop"]))
    data["keep_checkpoints"] = draw(st.integers(1, 3))
    return data


@settings(max_examples=10, **SETTINGS)
@given(data=valid_config(), fmt=st.sampled_from(["yaml", "json"]))
def test_valid_tiny_configs_run_one_step(tmp_path_factory, data, fmt):
    folder = Path(tmp_path_factory.mktemp("valid"))
    path = folder / f"run.{fmt}"
    path.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    result = RUNNER.invoke(app, ["run", "--config", str(path), "--no-progress", "--out",
                                 str(folder / "out")])
    assert result.exit_code == 0, (data, result.output)
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["outer_steps"] == 1
    COUNTS["valid"] += 1


def test_report_counts():
    """Prints how many examples the fuzz tests ran (run with -s to see it)."""
    print(f"\nfuzzed configurations run: {COUNTS}")
