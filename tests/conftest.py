"""Test-session settings shared by every test file.

JAX's persistent compilation cache (pes.runs.compile_cache) is on for the test process and for
every `pes` process a test starts, in the repository's .cache/jax-tests (PES_TEST_COMPILE_CACHE
overrides the folder; PES_NO_COMPILE_CACHE=1 turns it off): a second session, and the many
subprocesses of the crash and lock tests, load compiled programs instead of compiling them.
Never the user's own cache folder.
"""

import os
from pathlib import Path

from pes.runs import compile_cache

_DIR = os.environ.get("PES_TEST_COMPILE_CACHE") or str(
    Path(__file__).resolve().parents[1] / ".cache" / "jax-tests")
os.environ[compile_cache.ENV_DIR] = _DIR
compile_cache.enable()
