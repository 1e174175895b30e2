"""`pes` slowed down so that a test can stop it at a chosen moment: ``python slow_pes.py ARGS``.

SLOW_PES_STEP_DELAY: seconds to sleep after every outer step is recorded (so a short run
  lasts long enough to be killed in the middle).
SLOW_PES_COMMIT_DELAY: seconds every checkpoint write waits, its files written into orbax's
  temporary folder, before it is committed by renaming the folder (so a test can kill the
  process while a write is in progress).

Nothing else changes: the run computes exactly what ``pes ARGS`` computes.
"""

import asyncio
import os
import sys
import time

import pes.runs.run as run_module
from pes.cli import main

STEP_DELAY = float(os.environ.get("SLOW_PES_STEP_DELAY", "0"))
COMMIT_DELAY = float(os.environ.get("SLOW_PES_COMMIT_DELAY", "0"))

if STEP_DELAY:
    _callback = run_module._Recorder.callback

    def slow_callback(self, record, theta):
        stop = _callback(self, record, theta)
        time.sleep(STEP_DELAY)
        return stop

    run_module._Recorder.callback = slow_callback

if COMMIT_DELAY:
    # orbax's local-filesystem commit: files go to DIR/STEP.orbax-checkpoint-tmp, then
    # finalize() renames the folder to DIR/STEP (orbax-checkpoint 0.12).
    import orbax.checkpoint._src.path.atomicity as atomicity

    _finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *args, **kwargs):
        await asyncio.sleep(COMMIT_DELAY)
        return await _finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

if __name__ == "__main__":
    sys.argv[0] = "pes"
    main()
