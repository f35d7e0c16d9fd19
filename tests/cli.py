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
import subprocess
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path

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
