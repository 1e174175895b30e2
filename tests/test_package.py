"""The sdist and wheel: `python -m build` makes both, `twine check` accepts them, and the wheel,
installed into a fresh virtual environment outside the repository, runs `pes list`, a tiny
`pes run`, `pes --version` and the README's quick start.

Nothing is downloaded: the build runs without isolation (this environment's setuptools), the
wheel is installed with --no-deps, and the new environment borrows this one's third-party
packages through a .pth line (a plain path, so this environment's editable `pes` is not
picked up). The test checks that `pes` is imported from inside the new environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a source distribution is built from (a fresh clone has exactly these).
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff",
           "MANIFEST.in", "pes"]
# Files the package reads at run time, which must be in the wheel.
DATA_FILES = ["pes/tasks/data/pride_and_prejudice.txt", "pes/pretrained/learned_optimizer.npz"]

pytestmark = pytest.mark.slow


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install build twine setuptools>=77)")


def _version() -> str:
    text = (ROOT / "pes" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(cmd, cwd, timeout=600, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env or _clean_env())
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _quick_start() -> str:
    """The README's first Python block after '## Quick start'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    _needs("build", "twine", "setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
         cwd=src)
    return out


def test_build_and_twine_check(dist):
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"pes-{_version()}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"pes-{_version()}.tar.gz"]
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)],
         cwd=dist)
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for data in DATA_FILES:
        assert data in names, f"{data} is missing from the wheel"
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "docs/", "examples/")) for n in names)


def test_wheel_in_fresh_venv(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                        "['purelib'])"], cwd=tmp_path).strip())
    # This environment's third-party packages, as a plain path (its .pth files, among them
    # the editable install of the repository, are not processed from there).
    (purelib / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(dist.glob("*.whl"))
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path)

    where = _run([str(py), "-c", "import pes; print(pes.__file__)"], cwd=tmp_path).strip()
    assert Path(where).is_relative_to(venv), f"pes imported from {where}, not the new venv"
    assert not Path(where).is_relative_to(ROOT)

    pes_cmd = str(venv / "bin" / "pes")
    assert _run([pes_cmd, "--version"], cwd=tmp_path).strip() == f"pes {_version()}"
    listing = _run([pes_cmd, "list"], cwd=tmp_path)
    assert "toy-regression" in listing and "pes" in listing
    run_dir = tmp_path / "run"
    _run([pes_cmd, "run", "toy-regression", "-e", "pes", "--num-steps", "3",
          "--num-particles", "4", "--out", str(run_dir), "--no-progress"], cwd=tmp_path)
    assert (run_dir / "summary.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 3
    # Package data is found inside the installed package.
    _run([str(py), "-c", "import pes; "
          "pes.learned_optimizer.load(pes.learned_optimizer.pretrained_path()); "
          "from pes.tasks import text_lstm; assert len(text_lstm.load_text()) >= 1000"],
         cwd=tmp_path)

    script = tmp_path / "quickstart.py"
    script.write_text(_quick_start())
    out = _run([str(py), str(script)], cwd=tmp_path)
    assert out.strip(), "the quick start printed nothing"
