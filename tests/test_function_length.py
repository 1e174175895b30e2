"""No function in pes/ is over 100 lines (docstring included, decorators not): a reader sees a
whole function at once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pes"
LIMIT = 100

# "module:function": why it may be longer for now. Keep this empty.
ALLOWED: dict[str, str] = {}


def long_functions(root: Path = PACKAGE, limit: int = LIMIT) -> dict[str, int]:
    """{"module:function": lines} of every function (methods and nested ones too) over
    ``limit`` lines in the .py files under ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[f"{module}:{node.name}"] = lines
    return found


def test_no_function_over_100_lines():
    long = {k: n for k, n in long_functions().items() if k not in ALLOWED}
    assert not long, f"functions over {LIMIT} lines (split them): {long}"


def test_allowed_long_functions_are_still_long():
    stale = set(ALLOWED) - set(long_functions())
    assert not stale, f"no longer over {LIMIT} lines, drop from ALLOWED: {sorted(stale)}"


def test_a_long_function_is_caught(tmp_path):
    pkg = tmp_path / "pes"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    (pkg / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(pkg) == {"pes.m:long": LIMIT + 1}
