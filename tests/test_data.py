"""pes.data: IDX reading and writing, the search order, clear errors, verified downloads."""

import functools
import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from pes import data

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
STEMS = data.FILE_NAMES


def make_dataset_dir(directory: Path, num_train=30, num_test=10, gz=True, seed=0) -> Path:
    """Four small IDX files (28x28 images) in ``directory``; returns it."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem, n in zip(STEMS, (num_train, num_train, num_test, num_test), strict=True):
        if "images" in stem:
            arr = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        else:
            arr = rng.integers(0, 10, n, dtype=np.uint8)
        data.write_idx(directory / f"{stem}{suffix}", arr)
    return directory


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $PES_DATA_DIR, an empty cache and no Debian folder: only what a test creates."""
    monkeypatch.delenv("PES_DATA_DIR", raising=False)
    monkeypatch.setenv("PES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(data.DEBIAN_DIRS, "fashion-mnist", tmp_path / "debian" / "fashion-mnist")
    return tmp_path


# ------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, 1, 4, 1, 5], np.uint8),
        np.array([[-7, 2**20], [5, 0]], np.int32),
        np.array([0.5, -1.25, 3e9], np.float32),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32"],
)
def test_idx_round_trip(tmp_path, arr, suffix):
    path = data.write_idx(tmp_path / f"x-idx{suffix}", arr)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = data.read_idx(path)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_idx_header_is_the_standard_one(tmp_path):
    path = data.write_idx(tmp_path / "labels", np.array([7, 2], np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 2])


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_named(tmp_path, gz):
    raw = tmp_path / "train-images-idx3-ubyte"
    data.write_idx(raw, np.zeros((4, 28, 28), np.uint8))
    payload = raw.read_bytes()[:-100]
    target = tmp_path / ("cut.gz" if gz else "cut")
    if gz:
        target.write_bytes(gzip.compress(payload))
    else:
        target.write_bytes(payload)
    with pytest.raises(data.CorruptFileError, match="truncated") as info:
        data.read_idx(target)
    assert str(target) in str(info.value) and info.value.path == target


def test_bad_magic_and_bad_gzip_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(data.CorruptFileError, match="magic") as info:
        data.read_idx(bad)
    assert str(bad) in str(info.value)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01" * 5)[:-12])
    with pytest.raises(data.CorruptFileError) as info:
        data.read_idx(broken)
    assert str(broken) in str(info.value)


def test_corrupt_file_in_a_dataset_names_it(isolated):
    directory = make_dataset_dir(isolated / "d")
    labels = directory / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-8])
    with pytest.raises(data.CorruptFileError) as info:
        data.load("mnist", directory, validation_size=5)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


# ---------------------------------------------------------------------------- load / find


@pytest.mark.parametrize("gz", [False, True])
def test_load_splits_and_dtypes(isolated, gz):
    directory = make_dataset_dir(isolated / "d", num_train=30, num_test=10, gz=gz)
    ds = data.load("mnist", directory, validation_size=12)
    images = data.read_idx(directory / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    labels = data.read_idx(directory / ("train-labels-idx1-ubyte" + (".gz" if gz else "")))
    assert ds.train_images.shape == (18, 784) and ds.valid_images.shape == (12, 784)
    assert ds.test_images.shape == (10, 784)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    # The validation split is the last 12 training examples, in order.
    np.testing.assert_allclose(ds.valid_images, images[18:].reshape(12, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.valid_labels, labels[18:])
    np.testing.assert_array_equal(ds.train_labels, labels[:18])
    assert ds.source == directory and not ds.train_images.flags.writeable
    assert ds.split("valid")[0] is ds.valid_images
    with pytest.raises(ValueError, match="validation_size=30"):
        data.load("mnist", directory, validation_size=30)


def test_missing_dataset_message(isolated, monkeypatch):
    monkeypatch.setenv("PES_DATA_DIR", str(isolated / "env"))
    partial = isolated / "explicit" / "fashion-mnist"
    make_dataset_dir(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("fashion-mnist", isolated / "explicit")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    for path in data.search_paths("fashion-mnist", isolated / "explicit"):
        assert str(path) in msg
    assert "has 2 of 4 files" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "pes data download fashion-mnist" in msg
    with pytest.raises(data.DatasetNotFoundError, match="pes data download mnist") as info:
        data.load("mnist")
    assert "apt-get" not in str(info.value)  # Debian packages only Fashion-MNIST


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="known datasets"):
        data.load("cifar10")


def test_search_order(isolated, monkeypatch):
    name = "fashion-mnist"
    explicit = make_dataset_dir(isolated / "explicit" / name, num_train=21)
    env = make_dataset_dir(isolated / "env" / name, num_train=22)
    debian = make_dataset_dir(data.DEBIAN_DIRS[name], num_train=23)
    cache = make_dataset_dir(data.default_cache_dir(name), num_train=24)
    monkeypatch.setenv("PES_DATA_DIR", str(isolated / "env"))
    # An explicit location is the only one searched: --data-dir, then $PES_DATA_DIR, then
    # $PES_CACHE_DIR; with none of them, Debian's folder, then the default cache.
    assert data.search_paths(name, isolated / "explicit") == [explicit, isolated / "explicit"]
    assert data.search_paths(name) == [env]

    def n_train(data_dir=None):
        ds = data.load(name, data_dir, validation_size=1)
        return len(ds.train_labels) + 1, ds.source

    assert n_train(isolated / "explicit") == (21, explicit)
    assert n_train(explicit) == (21, explicit)  # the dataset's own folder works too
    assert n_train() == (22, env)
    monkeypatch.delenv("PES_DATA_DIR")
    assert data.search_paths(name) == [cache]  # $PES_CACHE_DIR (the fixture's) is explicit
    assert n_train() == (24, cache)
    xdg = isolated / "xdg"
    monkeypatch.delenv("PES_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert data.search_paths(name) == [debian, xdg / "pes" / name]
    assert n_train() == (23, debian)
    for f in debian.iterdir():
        f.unlink()
    make_dataset_dir(xdg / "pes" / name, num_train=25)
    assert n_train() == (25, xdg / "pes" / name)


@pytest.mark.parametrize("setting", ["--data-dir", "$PES_DATA_DIR", "$PES_CACHE_DIR"])
def test_explicit_location_is_authoritative(isolated, monkeypatch, setting):
    """A wrong explicit folder is an error naming it, never a silent fall-through to data found
    elsewhere (issue 20: `--data-dir /nonexistent` trained on Debian's Fashion-MNIST)."""
    name = "fashion-mnist"
    make_dataset_dir(data.DEBIAN_DIRS[name])
    wrong = isolated / "nonexistent"
    data_dir = None
    if setting == "--data-dir":
        data_dir = wrong
        monkeypatch.setenv("PES_DATA_DIR", str(wrong))  # the command set both
    elif setting == "$PES_DATA_DIR":
        monkeypatch.setenv("PES_DATA_DIR", str(wrong))
    else:
        monkeypatch.setenv("PES_CACHE_DIR", str(wrong))
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load(name, data_dir)
    msg = str(info.value)
    assert info.value.explicit == setting
    assert f"not found in {setting} {wrong}" in msg
    assert str(wrong / name) in msg and str(data.DEBIAN_DIRS[name]) not in msg.split("To get")[0]
    # Without any explicit location the default order finds Debian's copy.
    monkeypatch.delenv("PES_DATA_DIR", raising=False)
    monkeypatch.delenv("PES_CACHE_DIR", raising=False)
    assert data.load(name, validation_size=1).source == data.DEBIAN_DIRS[name]


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PES_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_cache_dir("mnist") == tmp_path / "pes" / "mnist"


def test_downsample():
    flat = np.full((2, 784), 0.5, np.float32)
    np.testing.assert_allclose(data.downsample(flat), 0.5, rtol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.random((3, 784)).astype(np.float32)
    small = data.downsample(x, 8)
    assert small.shape == (3, 64) and small.dtype == np.float32
    np.testing.assert_allclose(small.mean(1), x.mean(1), rtol=1e-5)  # area averaging
    np.testing.assert_allclose(data.downsample(x, 28), x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- download


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list  # set per server
    truncate: set   # file names sent with a full Content-Length but half the body

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name in self.truncate:
            body = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving generated IDX .gz files under /files/."""
    root = tmp_path / "served"
    make_dataset_dir(root / "files", num_train=25, num_test=7, seed=3)
    handler = type("Handler", (_Handler,), {"requests": [], "truncate": set()})
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/files/"
    srv.files = root / "files"
    srv.handler = handler
    yield srv
    srv.shutdown()
    srv.server_close()


def _digests(directory: Path) -> dict[str, str]:
    return {f"{s}.gz": hashlib.sha256((directory / f"{s}.gz").read_bytes()).hexdigest()
            for s in STEMS}


def test_download_verifies_and_loads(server, isolated, monkeypatch):
    monkeypatch.setitem(data.CHECKSUMS, "mnist", _digests(server.files))
    messages = []
    target = data.download("mnist", base_url=server.url, progress=messages.append)
    assert target == data.default_cache_dir("mnist")
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in STEMS)
    assert len(server.handler.requests) == 4
    ds = data.load("mnist", validation_size=5)  # found in the cache
    assert ds.source == target and len(ds.train_labels) == 20 and len(ds.test_labels) == 7
    # Verified files are not fetched again.
    data.download("mnist", base_url=server.url)
    assert len(server.handler.requests) == 4
    assert any("checksum ok" in m for m in messages)


def test_download_with_wrong_digest_writes_nothing(server, isolated, monkeypatch):
    digests = _digests(server.files)
    digests["train-labels-idx1-ubyte.gz"] = "0" * 64
    monkeypatch.setitem(data.CHECKSUMS, "mnist", digests)
    target = isolated / "dl"
    with pytest.raises(data.ChecksumError) as info:
        data.download("mnist", cache_dir=target, base_url=server.url)
    assert "train-labels-idx1-ubyte.gz" in str(info.value) and "0" * 64 in str(info.value)
    # The file before it was verified and kept; the bad one and any temporary file are gone.
    assert sorted(p.name for p in target.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_interrupted_download_leaves_no_file(server, isolated, monkeypatch):
    monkeypatch.setitem(data.CHECKSUMS, "mnist", _digests(server.files))
    server.handler.truncate.add("train-images-idx3-ubyte.gz")
    target = isolated / "dl"
    with pytest.raises(OSError, match="train-images-idx3-ubyte.gz") as info:
        data.download("mnist", cache_dir=target, base_url=server.url)
    assert not isinstance(info.value, data.ChecksumError)
    assert list(target.iterdir()) == []


def test_download_reports_unreachable_mirror(isolated, monkeypatch, server):
    monkeypatch.setitem(data.CHECKSUMS, "mnist", _digests(server.files))
    with pytest.raises(OSError, match="could not download") as info:
        data.download("mnist", cache_dir=isolated / "dl", base_url=server.url + "missing/")
    assert "404" in str(info.value)
    assert list((isolated / "dl").iterdir()) == []


def test_checksum_table_documents_its_sources():
    for name in data.DATASET_NAMES:
        assert sorted(data.CHECKSUMS[name]) == sorted(f"{s}.gz" for s in STEMS)
        assert all(len(v) == 64 for v in data.CHECKSUMS[name].values())
        assert name in data.CHECKSUM_SOURCES and data.MIRRORS[name]


# ---------------------------------------------------------------------- the real dataset

def require_debian_dataset():
    """Skip (with the reason) where Debian's dataset-fashion-mnist is not installed; under CI
    (``$CI`` set) fail instead, since CI installs it and must not skip these tests."""
    if DEBIAN.is_dir():
        return
    reason = (f"{DEBIAN} is absent: install Debian's dataset-fashion-mnist "
              "(`apt-get install dataset-fashion-mnist`) to run the tests on the real data")
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI must install it (.ci/run) rather than skip these tests")
    pytest.skip(reason)


def test_debian_fashion_mnist(monkeypatch, tmp_path):
    require_debian_dataset()
    monkeypatch.delenv("PES_DATA_DIR", raising=False)
    monkeypatch.delenv("PES_CACHE_DIR", raising=False)
    ds = data.load("fashion-mnist")
    assert ds.source == DEBIAN
    with pytest.raises(data.DatasetNotFoundError, match="--data-dir"):
        data.load("fashion-mnist", tmp_path / "nothing-here")  # explicit: no fall-through
    assert (len(ds.train_labels), len(ds.valid_labels), len(ds.test_labels)) == (
        50000, 10000, 10000)
    assert ds.train_images.shape == (50000, 784) and ds.train_images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
    for stem in STEMS:
        assert data.verify_file("fashion-mnist", DEBIAN / f"{stem}.gz"), stem


def test_pes_run_with_a_wrong_data_dir_is_one_line_naming_it(isolated, monkeypatch):
    """Issue 20: `pes run mnist-lr-schedule --data-dir /nonexistent` (PES_DATA_DIR too) trained
    on Debian's Fashion-MNIST; now it is exit 2 naming --data-dir, and nothing is written."""
    from typer.testing import CliRunner

    from pes.cli import app

    make_dataset_dir(data.DEBIAN_DIRS["fashion-mnist"])
    wrong = isolated / "nonexistent"
    monkeypatch.setenv("PES_DATA_DIR", str(wrong))
    out = isolated / "run"
    result = CliRunner().invoke(app, ["run", "mnist-lr-schedule", "-e", "pes", "--data-dir",
                                      str(wrong), "--size", "tiny", "--num-steps", "1", "--out",
                                      str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"not found in --data-dir {wrong}" in lines[0], result.output
    assert not out.exists()
