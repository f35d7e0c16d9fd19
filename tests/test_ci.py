"""The CI entry point runs the README's test command with CI set, whatever the CI system sets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_run_sets_ci_itself_and_runs_make_test(tmp_path: Path) -> None:
    # Given a CI system that does not set CI (a `make` on PATH that only records how it was called)
    record = tmp_path / "make-called"
    (tmp_path / "make").write_text(f'#!/bin/sh\necho "CI=$CI $*" > {record}\n')
    (tmp_path / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    # When .ci/run runs
    subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, check=True, timeout=30)
    # Then it ran `make test` with CI=1, so a missing service (or any skip) fails the run
    assert record.read_text().strip() == "CI=1 test"
