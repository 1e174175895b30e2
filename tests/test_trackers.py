"""Experiment trackers (pes.loggers, pes run --log): what each backend wrote is read back with
that library's own reader and compared with metrics.jsonl. One tiny run per backend."""

import glob
import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from typer.testing import CliRunner

import pes
import pes.runs.run as run_module
from pes.cli import app
from pes.loggers import Logger, MissingExtraError, flat_metrics, make_loggers
from pes.runs import RunConfig, execute_run, read_metrics

RUNNER = CliRunner()


class Drift:
    """s' = s + theta, loss |s' - 1|^2: a two-number theta, episodes of 4 steps."""

    horizon = 4

    def init(self, key):
        return jnp.zeros(2)

    def step(self, s, theta, t, key):
        s = s + theta
        return s, jnp.sum((s - 1.0) ** 2)


def _run(tmp_path, log, **overrides):
    cfg = RunConfig(task="toy-regression", estimator="pes", num_steps=4, eval_every=2,
                    num_particles=4, out=str(tmp_path / "run"), **overrides)
    return execute_run(cfg, progress=False, log=log)


def _installed(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One tiny run logged to every installed backend (one compilation for all tests)."""
    env = pytest.MonkeyPatch()
    env.delenv("WANDB_API_KEY", raising=False)
    env.delenv("WANDB_MODE", raising=False)
    log = [name for name, module in (("tensorboard", "tensorboardX"), ("wandb", "wandb"),
                                     ("mlflow", "mlflow")) if _installed(module)]
    try:
        yield _run(tmp_path_factory.mktemp("logged"), log) if log else None
    finally:
        env.undo()


def _scalars_by_step(records, name):
    return {r["step"]: r[name] for r in records if r.get(name) is not None}


def test_flat_metrics_names_groups_and_skips_axes():
    line = {"step": 3, "inner_steps": 30, "loss": 1.5, "meta_objective": None,
            "eval": {"meta_loss": 2.0, "accuracy": 0.5}, "theta": [1.0, -2.0]}
    assert flat_metrics(line) == {"loss": 1.5, "eval/meta_loss": 2.0, "eval/accuracy": 0.5,
                                  "theta/0": 1.0, "theta/1": -2.0}


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_metrics_plots_and_config(logged_run):
    pytest.importorskip("tensorboardX")
    ea_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = logged_run
    records = read_metrics(result.run_dir)
    acc = ea_module.EventAccumulator(str(result.run_dir / "tensorboard"),
                                     size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for name, by in (("loss", "step"), ("meta_objective", "step"),
                     ("by_inner_steps/loss", "inner_steps")):
        key = name.split("/")[-1]
        want = {r[by]: r[key] for r in records if r.get(key) is not None}
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got.keys() == want.keys(), name
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6)
    assert {"plots/meta_objective", "plots/theta"} <= set(tags["images"])
    png = acc.Images("plots/meta_objective")[0].encoded_image_string
    assert png == (result.run_dir / "meta_objective.png").read_bytes()
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"task": "toy-regression"' in config_text
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams


def _wandb_records(path):
    """The protobuf Records of a .wandb file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield record
        elif kind in (2, 3):
            buf += chunk


@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_metrics_and_config(logged_run):
    pytest.importorskip("wandb")
    result = logged_run
    records = read_metrics(result.run_dir)
    [path] = glob.glob(str(result.run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert config["task"] == "toy-regression" and config["num_particles"] == 4
    assert sorted(history) == [r["step"] for r in records]
    for r in records:
        row = history[r["step"]]
        assert row["inner_steps"] == r["inner_steps"]
        assert row["theta/0"] == pytest.approx(r["theta"][0])
        for key in ("loss", "meta_objective"):
            if r.get(key) is not None:
                assert row[key] == pytest.approx(r[key]) == row[f"by_inner_steps/{key}"]
    last = history[max(history)]
    assert last["plots/meta_objective/_type"] == "image-file"
    assert glob.glob(str(result.run_dir / "wandb" / "offline-run-*" / "files" / "media" /
                         "images" / "plots" / "meta_objective_*.png"))


@pytest.mark.slow
def test_mlflow_file_store_holds_the_metrics_params_and_plots(logged_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    result = logged_run
    records = read_metrics(result.run_dir)
    client = MlflowClient(tracking_uri=(result.run_dir / "mlruns").absolute().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("pes").experiment_id])
    assert run.data.params["task"] == "toy-regression"
    assert run.info.status == "FINISHED"
    for key in ("loss", "meta_objective", "inner_steps"):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == pytest.approx(_scalars_by_step(records, key)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/meta_objective.png", "plots/theta.png"} <= artifacts


@pytest.mark.slow
def test_train_calls_loggers_with_every_record_and_only_on_process_0(monkeypatch):
    class Memory:
        def __init__(self):
            self.rows = []

        def log_config(self, config):
            pass

        def log_metrics(self, step, metrics, inner_steps):
            self.rows.append((step, dict(metrics), inner_steps))

        def log_image(self, name, path):
            pass

        def close(self):
            pass

    system = Drift()
    est = pes.PES(system, num_particles=4, sigma=0.1, truncation_length=2)
    memory = Memory()
    assert isinstance(memory, Logger)
    result = pes.train(est, jnp.zeros(2), optax.sgd(0.01), num_steps=3,
                       key=jax.random.PRNGKey(0), eval_every=2, loggers=[memory])
    assert [row[0] for row in memory.rows] == [r.step for r in result.history] == [0, 1, 2, 3]
    assert [row[2] for row in memory.rows] == [r.inner_steps for r in result.history]
    assert "loss" not in memory.rows[0][1] and memory.rows[1][1]["loss"] == \
        result.history[1].loss
    assert memory.rows[2][1]["meta_objective"] == result.history[2].meta_objective
    assert "meta_objective" not in memory.rows[1][1]

    other = Memory()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    pes.train(est, jnp.zeros(2), optax.sgd(0.01), num_steps=2, key=jax.random.PRNGKey(0),
              loggers=[other])
    assert other.rows == []


def test_only_process_0_logs_a_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    monkeypatch.setattr(run_module, "is_primary", lambda: False)
    monkeypatch.setattr(run_module, "barrier", lambda name: None)
    _run(tmp_path, "tensorboard")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_missing_backend_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with pytest.raises(MissingExtraError, match=r"pes\[tensorboard\]"):
        make_loggers("tensorboard", tmp_path)
    result = RUNNER.invoke(app, ["run", "toy-regression", "-e", "pes", "--num-steps", "1",
                                 "--out", str(tmp_path / "r"), "--log", "tensorboard,mlflow"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --log tensorboard needs the tensorboardX package, which is not installed: "
        "pip install 'pes[tensorboard]'"]
    assert not (tmp_path / "r").exists()
    result = RUNNER.invoke(app, ["compare", "toy-regression", "--log", "nope"])
    assert result.exit_code == 2 and "unknown logger 'nope'" in result.output
