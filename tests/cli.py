"""``tuwen …`` run in this process (typer's ``CliRunner``), answering as the subprocess would. A helper, not tests.

The CLI tests' matrices (every command × every awkward id, every refused input) run here: a subprocess costs a
Python start and tuwen's imports, about a second, per call. Each matrix keeps one subprocess smoke test beside
it, so that the installed entry point (``python -m tuwen.workers.cli``) still runs for real.

What a subprocess gave and this keeps: the exit code, stdout and stderr apart, and the environment (the
``TUWEN_*`` variables are those of ``env`` alone: the test process's own are unset for the call). An exception
that escapes the command is written to stderr with its traceback, as Python prints it, so that a test's
``"Traceback" not in stderr`` still means something.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def tuwen_here(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """The whole ``tuwen`` command (producer and model-side commands), in this process."""
    from typer.testing import CliRunner

    from tuwen.workers.cli import app

    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUWEN_") and k not in env}
    result = CliRunner().invoke(app, list(args), env={**unset, **env})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["tuwen", *args], result.exit_code, result.stdout, stderr)


def tuwen_process(*args: str, env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The same command as a real subprocess (``python -m tuwen.workers.cli``), with the ``TUWEN_*`` variables of
    ``env`` alone and the rest of this process's environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}
    return subprocess.run([sys.executable, "-m", "tuwen.workers.cli", *args], env={**base, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def at_a_terminal() -> None:
    """Ctrl-C as at a terminal: a test run started in the background (bash ignores SIGINT in asynchronous
    commands, and children inherit that) would otherwise start the command with SIGINT ignored, and Python
    then installs no KeyboardInterrupt at all (seen: the waiting command sat out SIGINT for 20 s)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def as_at_a_terminal(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """``args`` started as a user at a terminal starts it (SIGINT at its default, for the Ctrl-C tests), and
    killed at the end of the block if it still runs (a test that failed half-way leaves nothing behind)."""
    proc = subprocess.Popen(args, text=True, preexec_fn=at_a_terminal, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
