"""Documentation that runs: every ```python block of README.md and docs/**/*.md runs (the blocks
of one file in order, in one namespace, as a reader would paste them), unless the line before it
is ``<!-- not-run: REASON -->``; every `pes ...` command shown parses against the command-line
app (types included, nothing executed); the README's sharding example runs at a tiny size; the
``Examples`` sections of the public modules run as doctests; and the site builds with
``mkdocs build --strict``.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->\s*$")
# Placeholders of commands written inline in prose, and what a test puts in their place.
PLACEHOLDERS = {"TASK": "toy-regression", "RUN_DIR": "runs/x", "EXPERIMENT": "toy-regression",
                "N": "2", "M": "2", "DIR": "data", "ESTIMATOR": "pes"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path):
    """(language, code, not-run reason or None, line) of each fenced block."""
    text = path.read_text()
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = NOT_RUN.search(before)
        line = text[: m.start()].count("\n") + 1
        yield m.group(1), m.group(2), (mark.group(1).strip() if mark else None), line


def _python_files():
    """Files with at least one Python block to run."""
    return [p for p in DOC_FILES
            if any(lang == "python" and reason is None for lang, _, reason, _ in _blocks(p))]


def test_not_run_marks_give_a_reason():
    for path in DOC_FILES:
        for lang, _, reason, line in _blocks(path):
            if reason is not None:
                assert lang == "python", f"{_rel(path)}:{line}: not-run on a {lang!r} block"
                assert reason, f"{_rel(path)}:{line}: not-run needs a reason"


@pytest.mark.slow
@pytest.mark.parametrize("path", _python_files(), ids=_rel)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_block__"}
    ran = 0
    for lang, code, reason, line in _blocks(path):
        if lang != "python" or reason is not None:
            continue
        try:
            exec(compile(code, f"{_rel(path)}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the block at {_rel(path)}:{line} raised {e!r}") from e
        ran += 1
    assert ran


# ---------------------------------------------------------------- commands
def _shell_commands(path: Path):
    """`pes ...` lines of sh blocks (continuations joined, prompts, env and srun stripped)."""
    for lang, code, _, line in _blocks(path):
        if lang not in ("sh", "bash", "console", "shell"):
            continue
        for cmd in code.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"^\S+\$ ", "", cmd.strip())       # node1$ prompts
            words = shlex.split(cmd, comments=True)
            while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in ("srun",)):
                words = words[1:]
            if words[:1] == ["pes"]:
                yield words[1:], f"{_rel(path)}:{line}"


def _inline_commands(path: Path):
    """`pes ...` written inline in prose, placeholders filled in. Left out, as they are not
    commands one can paste: spans with '...' or alternatives ([a|b]), a command's bare name
    (`pes compare`) and the mention of one option (`pes run --config`)."""
    text = FENCE.sub("", path.read_text())
    for m in re.finditer(r"`(pes (?:list|run|compare|surface|diagnose|data)\b[^`]*)`", text):
        cmd = m.group(1)
        if "..." in cmd or "[" in cmd or "|" in cmd:
            continue
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(cmd)]
        if len(words) == 2 and words[1] != "list" or words[-1].startswith("-"):
            continue
        yield words[1:], f"{_rel(path)}: `{cmd}`"


def _all_commands():
    found = []
    for path in DOC_FILES:
        found += list(_shell_commands(path)) + list(_inline_commands(path))
    return found


def _parse(args: list[str]):
    """Parse ``pes ARGS`` as the app would, down to the leaf command, without running it."""
    import typer

    from pes.cli import app

    command, name, parent, args = typer.main.get_command(app), "pes", None, list(args)
    while True:
        ctx = command.make_context(name, args, parent=parent)
        if not hasattr(command, "list_commands"):
            return ctx
        rest = [*(getattr(ctx, "_protected_args", None) or ctx.protected_args), *ctx.args]
        sub_name, command, args = command.resolve_command(ctx, rest)
        name, parent = f"{name} {sub_name}", ctx


def test_documented_commands_parse():
    commands = _all_commands()
    assert len(commands) >= 20, commands
    bad = []
    for args, where in commands:
        try:
            _parse(args)
        except Exception as e:
            if getattr(e, "exit_code", None) == 0:     # --version, --help: an eager exit
                continue
            message = e.format_message() if hasattr(e, "format_message") else repr(e)
            bad.append(f"{where}: pes {shlex.join(args)}: {message}")
    assert not bad, "\n".join(bad)


def test_parse_catches_a_bad_command():
    with pytest.raises(Exception, match="no-such-flag"):
        _parse(["run", "toy-regression", "--no-such-flag"])
    with pytest.raises(Exception, match="integer"):
        _parse(["run", "toy-regression", "--num-steps", "many"])


@pytest.mark.slow
def test_readme_sharding_example_runs(tmp_path):
    """The README's --devices example, as written, plus a tiny number of steps."""
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("XLA_FLAGS=") and "--devices" in ln)
    env_part, cmd = line.split(" ", 1)
    words = shlex.split(cmd)
    assert words[0] == "pes"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(dict([env_part.split("=", 1)]), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "pes", *words[1:], "--num-steps", "2",
                          "--out", str(tmp_path / "run"), "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


# ---------------------------------------------------------------- doctests
def _doctest_modules():
    names = []
    for path in sorted((ROOT / "pes").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if any(part.startswith("_") and part != "__init__" for part in rel.parts):
            continue
        if ">>>" in path.read_text():
            names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return names


def test_public_api_has_examples():
    import pes

    for obj in (pes.evaluate, pes.PES, pes.train):
        assert "Examples:" in (obj.__doc__ or ""), f"{obj.__qualname__} has no Examples section"


@pytest.mark.slow
@pytest.mark.parametrize("module", _doctest_modules())
def test_doctests(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    assert tests, f"{module} mentions >>> but has no doctest"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"


# ---------------------------------------------------------------- the site
@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    if any(importlib.util.find_spec(m) is None for m in ("mkdocs", "mkdocstrings")):
        pytest.skip("mkdocs is not installed (pip install '.[docs]')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    for page in ("index.html", "concepts/index.html", "cli/index.html", "api/index.html",
                 "results/index.html", "benchmarks/index.html", "design/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert 'id="pes-run"' in cli and 'id="pes-data-download"' in cli
