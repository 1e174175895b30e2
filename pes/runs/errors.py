"""Errors a user of the run layer can cause or meet, each one line that names the culprit."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting the user gave is wrong, unknown or contradicts another one.

    ``field`` names the setting (a RunConfig field, a command-line argument or a file) when
    there is one. The command line prints the message on one line and exits with status 2.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class RunFailed(RuntimeError):
    """A run stopped before its last outer step (e.g. a non-finite gradient).

    Its run directory is complete up to the failure: config.json, every metrics line written
    so far, and a summary.json whose ``status`` is ``"failed"`` and whose ``error`` is this
    message. ``result`` is the RunResult describing it.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM (or a KeyboardInterrupt) before its last step.

    The run checkpointed its last complete outer step, wrote summary.json (``status``
    ``"interrupted"``) and its plots; ``pes run --resume RUN_DIR`` continues it. ``result`` is
    the RunResult, ``signal`` the signal number (SIGINT for a KeyboardInterrupt) and
    ``exit_code`` the shell's convention for it, 128 + signal (130 for SIGINT, 143 for
    SIGTERM). A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too.
    """

    def __init__(self, message: str, result=None, signal: int | None = None):
        super().__init__(message)
        self.result = result
        self.signal = int(signal) if signal is not None else 2
        self.exit_code = 128 + self.signal


class RunWarning(UserWarning):
    """Something the run layer did on the user's behalf that they should know about (a stale
    lock taken over, a damaged checkpoint skipped); the command line prints it as one line."""
